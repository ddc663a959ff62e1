"""Atomic file writes: write a temporary file in the target's folder, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a half-written one: ``os.replace`` is atomic within one file system, which is why the
temporary file lives beside the target rather than in /tmp.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _mkstemp_beside(path: Path) -> str:
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give it
    (mkstemp makes it 0600, whatever the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that only replaces ``path`` when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkstemp_beside(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_tmp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside ``path`` for writers that need a file name (pyarrow,
    ``np.save``); call :func:`commit` on it afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(_mkstemp_beside(path))


def commit(tmp: Path, path: str | os.PathLike) -> None:
    """fsync ``tmp`` and rename it onto ``path``."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def save_json(path: str | os.PathLike, obj) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_open`: a crash leaves the old checkpoint or the
    new one, never half of one."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
