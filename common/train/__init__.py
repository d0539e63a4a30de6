"""Local unified training: losses, augmentation, loss weighting, sample selection, the step."""

from common.train.config import TrainConfig, run_train_config, train_config
from common.train.engine import LocalTrainer, RoundMetrics

__all__ = ["LocalTrainer", "RoundMetrics", "TrainConfig", "run_train_config", "train_config"]
