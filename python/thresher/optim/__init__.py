"""thresher.optim: LowRankAdam, LoRDO and the distributed baselines (DDPAdamW, LowRankDDP, DiLoCo, SparseLoCo)."""
