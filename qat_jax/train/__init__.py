"""Training system: pure pmapped steps, the stage controller, calibration, checkpoints."""

from qat_jax.train.stages import ScheduleConfig, StageController
from qat_jax.train.state import TrainState
from qat_jax.train.trainer import ConfigError, train_and_evaluate

__all__ = ["ConfigError", "ScheduleConfig", "StageController", "TrainState", "train_and_evaluate"]
