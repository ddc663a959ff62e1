"""thresher.jobs: every job as a Python object with a config that round-trips through JSON;
the ``thresher`` command becomes a thin shell over these. ``JobConfig`` is the base of the
configs. Each job is ``XJob(XConfig(...)).run()``: training (TrainJob), pool scoring
(ScoreJob), selection (SelectJob) and the end-to-end demo (DemoJob); docs/api.md."""
from thresher.core.lazy import lazy_exports

# public name -> the submodule that defines it (imported on first use)
_EXPORTS = {"JobConfig": "config", "JobError": "config",
            "TrainConfig": "train", "TrainJob": "train", "ScoreConfig": "score", "ScoreJob": "score",
            "SelectConfig": "select", "SelectJob": "select", "DemoConfig": "demo", "DemoJob": "demo"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
