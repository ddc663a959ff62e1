"""thresher.jobs: every job as a Python object with a config that round-trips through JSON;
the ``thresher`` command becomes a thin shell over these. ``JobConfig`` is the base of the
configs; the training, scoring, selection and demo jobs move here from ``thresher.cli``."""
from thresher.core.lazy import lazy_exports

# public name -> the submodule that defines it (imported on first use)
_EXPORTS = {"JobConfig": "config", "JobError": "config"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
