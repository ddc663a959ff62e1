"""Run folders and content fingerprints: what keeps a command from silently reusing or
overwriting data. :func:`fingerprint` hashes a file's or a folder's content;
:func:`check_run_folder` is the rule every command that writes a run folder follows, and
:func:`record_run` records the settings once the inputs are validated: docs/data.md §5.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from thresher.core.files import save_json

__all__ = ["fingerprint", "check_run_folder", "record_run", "RUN_FILE"]

RUN_FILE = "run.json"
_CHUNK = 1 << 20


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)


def fingerprint(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of the content of a file or of a folder's files (hidden files and
    folders skipped, as the readers skip them)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        for f in files:
            rel = f.relative_to(p).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
            _hash_file(h, f)
    else:
        _hash_file(h, p)
    return "sha256:" + h.hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} then, {b!r} now)")
    return out


def check_run_folder(out: str | os.PathLike, settings: dict, *, resume: bool, flag: str = "--out",
                     shared: bool = False) -> bool:
    """Raises ``ValueError`` unless ``settings`` may run in ``out``; returns whether ``out``
    already holds a run with these settings (then it is continued).

    ``shared``: several ranks start together (torchrun), so another rank may have recorded
    the run already; it is then continued without ``--resume`` (the settings must still
    match). Nothing is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} exists and is not a folder")
    run_file = out / RUN_FILE
    if run_file.is_file():
        if not resume and not shared:
            raise ValueError(f"{flag} {str(out)!r} already holds a run; pass --resume to continue it "
                             "or choose another folder")
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag} {str(out)!r}: cannot read {RUN_FILE} ({e})") from None
        diff = _differences(old, json.loads(json.dumps(settings, default=str)))
        if diff:
            raise ValueError(f"settings differ from the run in {str(out)!r}: {'; '.join(diff)}; "
                             "rerun with the same settings or choose another folder")
        return True
    if out.is_dir() and any(out.iterdir()) and not (resume or shared):
        # (--resume: a run interrupted before it recorded its settings, e.g. in its data step)
        raise ValueError(f"{flag} {str(out)!r} is a non-empty folder without a thresher run; "
                         "choose another folder (or --resume an interrupted one)")
    return False


def record_run(out: str | os.PathLike, settings: dict) -> None:
    """Writes ``out/run.json`` (atomically); call after the inputs were validated."""
    save_json(Path(out) / RUN_FILE, settings)
