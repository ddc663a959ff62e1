"""thresher.jobs: every job as a Python object with a config that round-trips through JSON;
the ``thresher`` command is a thin shell over these (see docs/api.md).

    from thresher.jobs import TrainConfig, TrainJob
    summary = TrainJob(TrainConfig(optimizer="lordo", nproc=2, steps=100, out="runs/lordo")).run()
"""
from thresher.core.lazy import lazy_exports

# public name -> the submodule that defines it (imported on first use: no torch at import)
_EXPORTS = {
    "JobConfig": "config", "JobError": "config",
    "TrainConfig": "train", "TrainJob": "train",
    "ScoreConfig": "score", "ScoreJob": "score",
    "SelectConfig": "select", "SelectJob": "select",
    "DemoConfig": "demo", "DemoJob": "demo",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
