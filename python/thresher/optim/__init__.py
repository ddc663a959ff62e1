"""thresher.optim: LowRankAdam, LoRDO and the distributed baselines (DDPAdamW, LowRankDDP, DiLoCo,
SparseLoCo). ``DistMixin`` is the base of every optimizer that communicates itself (the test
for "does this optimizer do its own all-reduce", e.g. before wrapping a model in DDP)."""
from thresher.core.lazy import lazy_exports

# public name -> the submodule that defines it (imported on first use: no torch at import)
_EXPORTS = {
    'CollectiveError': '_dist',
    'DistMixin': '_dist',
    'DDPAdamW': 'ddp',
    'LowRankDDP': 'ddp',
    'DiLoCo': 'diloco',
    'SparseLoCo': 'diloco',
    'LoRDO': 'lordo',
    'LowRankAdam': 'lowrank_adam',
}

__all__ = ["LowRankAdam", "LoRDO", "DDPAdamW", "LowRankDDP", "DiLoCo", "SparseLoCo",
           "CollectiveError", "DistMixin"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
