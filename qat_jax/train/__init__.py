"""Training system: pure pmapped steps, the stage controller, calibration, checkpoints.

Importing the package (or a light module of it, e.g. :mod:`qat_jax.train.stages`) loads neither
the trainer nor orbax or the data pipeline: :func:`train_and_evaluate` and :class:`ConfigError`
(:mod:`qat_jax.experiment`'s) are imported on first use.
"""

from qat_jax.train.stages import ScheduleConfig, StageController
from qat_jax.train.state import TrainState

__all__ = ["ConfigError", "ScheduleConfig", "StageController", "TrainState", "train_and_evaluate"]


def __getattr__(name: str):
    if name == "train_and_evaluate":
        from qat_jax.train.trainer import train_and_evaluate

        return train_and_evaluate
    if name == "ConfigError":
        from qat_jax.experiment import ConfigError

        return ConfigError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
