"""thresher.optim: LowRankAdam, LoRDO and the distributed baselines (DDPAdamW, LowRankDDP, DiLoCo, SparseLoCo)."""
from .lowrank_adam import LowRankAdam

__all__ = ["LowRankAdam"]
