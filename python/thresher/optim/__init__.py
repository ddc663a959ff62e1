"""thresher.optim: LowRankAdam, LoRDO and the distributed baselines (DDPAdamW, LowRankDDP, DiLoCo, SparseLoCo)."""
from ._dist import CollectiveError
from .ddp import DDPAdamW, LowRankDDP
from .diloco import DiLoCo, SparseLoCo
from .lordo import LoRDO
from .lowrank_adam import LowRankAdam

__all__ = ["LowRankAdam", "LoRDO", "DDPAdamW", "LowRankDDP", "DiLoCo", "SparseLoCo",
           "CollectiveError"]
