"""What every numeric config key must be: one table, checked before any compute.

:func:`check_numbers` is the numeric part of :func:`qat_jax.experiment.validate_config` (which
adds the names, the batch sizes against the devices, the init checkpoint and the schedule on the
model's layers). A leaf module: it reads a config and imports nothing of qat_jax, so the table can
be read (and extended) without the builders around it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

__all__ = ["ConfigError", "check_numbers", "is_int"]


class ConfigError(ValueError):
    """A config that cannot run; raised before any compute starts."""


def is_int(v) -> bool:
    """An integer, and not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and v >= lo


_FINITE = "must be a finite number"
_POSITIVE = "must be a finite number > 0"
_NONNEG = "must be a finite number >= 0"
_FRACTION = "must be a finite number in [0, 1]"

#: ``(key, check, requirement)`` of every numeric key; a key a config lacks is skipped.
_NUMERIC: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", is_int, "must be an integer"),
    ("stage_eval_examples", _int_at_least(-1), "must be an integer >= -1 (-1: all, 0: none)"),
    ("log_every", _int_at_least(1), "must be an integer >= 1"),
    ("checkpoint_every", _int_at_least(1), "must be an integer >= 1"),
    ("keep_checkpoints", _int_at_least(1), "must be an integer >= 1"),
    ("halt_after_step", is_int, "must be an integer (<= 0: run to the end)"),
    ("model.width_mult", lambda v: _is_real(v) and v > 0, _POSITIVE),
    (
        "model.last_channel",
        lambda v: v is None or (is_int(v) and v >= 1),
        "must be an integer >= 1 (or None: the model's default)",
    ),
    ("model.dropout_rate", lambda v: _is_real(v) and 0 <= v < 1, "must be in [0, 1)"),
    (
        "dataset.image_size",
        lambda v: v is None or (is_int(v) and v >= 1),
        "must be an integer >= 1 (or None: the native size)",
    ),
    (
        "dataset.num_train_examples",
        lambda v: is_int(v) and v != 0,
        "must be -1 (all) or a positive integer",
    ),
    (
        "dataset.num_eval_examples",
        lambda v: is_int(v) and v != 0,
        "must be -1 (all) or a positive integer",
    ),
    ("dataset.worker_count", _int_at_least(0), "must be an integer >= 0 (0: in-process)"),
    ("dataset.read_threads", _int_at_least(0), "must be an integer >= 0 (0: synchronous)"),
    ("dataset.prefetch_batches", _int_at_least(0), "must be an integer >= 0"),
    ("fp.steps", _int_at_least(0), "must be an integer >= 0"),
    ("fp.learning_rate", lambda v: _is_real(v) and v > 0, _POSITIVE),
    ("fp.warmup_steps", _int_at_least(0), "must be an integer >= 0"),
    ("fp.final_lr_fraction", lambda v: _is_real(v) and 0 <= v <= 1, _FRACTION),
    ("fp.grad_clip", lambda v: _is_real(v) and v >= 0, f"{_NONNEG} (0: no clip)"),
    ("fp.weight_decay", lambda v: _is_real(v) and v >= 0, f"{_NONNEG} (0: none)"),
    ("optim.learning_rate", lambda v: _is_real(v) and v > 0, _POSITIVE),
    ("optim.warmup_steps", _int_at_least(0), "must be an integer >= 0"),
    ("optim.final_lr_fraction", lambda v: _is_real(v) and 0 <= v <= 1, _FRACTION),
    ("optim.grad_clip", lambda v: _is_real(v) and v >= 0, f"{_NONNEG} (0: no clip)"),
    ("optim.weight_decay", lambda v: _is_real(v) and v >= 0, f"{_NONNEG} (0: none)"),
    ("loss.label_smoothing", lambda v: _is_real(v) and 0 <= v < 1, "must be in [0, 1)"),
    ("loss.kd_weight", lambda v: _is_real(v) and v >= 0, _NONNEG),
    ("loss.kd_temperature", lambda v: _is_real(v) and v > 0, _POSITIVE),
    ("loss.info_weight", lambda v: _is_real(v) and v >= 0, _NONNEG),
    ("quant.gamma", lambda v: _is_real(v) and v >= 0, f"{_NONNEG} (the importance exponent)"),
    (
        "quant.weight_clip",
        lambda v: v is None or _is_real(v),
        f"{_FINITE} (<= 0 or None: no clip)",
    ),
    ("quant.refine_sweeps", _int_at_least(0), "must be an integer >= 0"),
    ("schedule.steps_per_stage", _int_at_least(1), "must be an integer > 0"),
    ("schedule.final_steps", _int_at_least(0), "must be an integer >= 0"),
    (
        "schedule.total_stage_steps",
        _int_at_least(0),
        "must be an integer >= 0 (0: steps_per_stage each)",
    ),
    ("schedule.acts_first_steps", _int_at_least(0), "must be an integer >= 0 (0: off)"),
    ("schedule.calib_batches", _int_at_least(1), "must be an integer >= 1"),
    ("schedule.bn_batches", _int_at_least(1), "must be an integer >= 1"),
)

_MISSING = object()


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return _MISSING
        node = node[part]
    return node


def check_numbers(config) -> None:
    """One-line :class:`ConfigError` for the first numeric key out of range (absent keys: skipped)."""
    for key, ok, requirement in _NUMERIC:
        value = _lookup(config, key)
        if value is not _MISSING and not ok(value):
            raise ConfigError(f"--config.{key}={value!r}: {requirement}")
    setting = _lookup(config, "model.inverted_residual_setting")
    if setting not in (_MISSING, None):
        rows = list(setting)
        if not rows or not all(
            len(row) == 4 and all(is_int(v) and v >= 1 for v in row) for row in rows
        ):
            raise ConfigError(
                f"--config.model.inverted_residual_setting={setting!r}: must be rows of 4 "
                "integers >= 1 (expansion t, channels c, repeats n, stride s)"
            )
