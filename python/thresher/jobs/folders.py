"""The out folder of a job (TrainJob, ScoreJob, DemoJob): the checks before a job writes into
it, and leaving a fresh folder as it was when the job fails before it recorded its run.

The run-folder rule itself is :func:`thresher.data.runs.check_run_folder`; docs/api.md#configs
says what a user can rely on.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from thresher.data.runs import RUN_FILE, check_run_folder
from thresher.jobs.config import JobError

__all__ = ["open_out", "undo_unrecorded"]


def open_out(out: str | os.PathLike, settings: dict, *, resume: bool, shared: bool = False,
             pre_run: tuple[str, ...] = ()) -> bool:
    """Checks that a job with ``settings`` may write into ``out``, creates it, and returns
    whether it was fresh (absent or empty). Beyond ``check_run_folder``: ``resume`` continues
    a folder without a recorded run only when it holds nothing but what the job writes before
    it records its run (``pre_run``: names in ``out``), so a folder of the user's own files is
    never written into."""
    p = Path(out)
    try:
        holds_run = check_run_folder(p, settings, resume=resume, shared=shared)
    except ValueError as e:
        raise JobError(str(e)) from None
    if not holds_run and resume and not shared and p.is_dir():
        foreign = sorted(e.name for e in p.iterdir() if e.name not in pre_run)
        if foreign:
            raise JobError(f"--out {str(out)!r} holds no thresher run but other files "
                           f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                           "--resume continues only a run folder: choose another folder")
    fresh = not p.is_dir() or not any(p.iterdir())
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission
        raise JobError(f"--out {str(out)!r}: cannot create the folder ({e.strerror or e})") from None
    return fresh


def undo_unrecorded(out: str | os.PathLike, fresh: bool, pre_run: tuple[str, ...]) -> None:
    """After a failure: a folder that was fresh and holds no recorded run yet loses what the
    job wrote before recording (``pre_run``), so that the corrected rerun can use it."""
    p = Path(out)
    if not fresh or (p / RUN_FILE).exists():
        return
    for name in pre_run:
        q = p / name
        if q.is_dir():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)
