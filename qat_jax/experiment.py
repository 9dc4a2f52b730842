"""The one translation config -> objects: validation, model, quant/schedule/loss configs, optimizer.

Every user builds from here: the trainer (:mod:`qat_jax.train.trainer`), the comparison, the
export and the summary (a run's model rebuilt from its saved config), the benchmarks and the
tests. The validation computes nothing (every numeric key is checked, and the schedule on the
model's layers from a traced init, before any data is read or any program compiled); the
builders turn a config into static objects (and :func:`create_train_state` into host arrays).

=============================  ================================================================
:func:`validate_config`        one-line :class:`ConfigError` naming the key and the fix (the
                               numeric keys' table: :mod:`qat_jax.config_checks`)
:func:`quant_config`           the layers' static :class:`~qat_jax.layers.QuantConfig`
:func:`variables_quant_config` the forward ``QuantConfig`` of a layer's saved variables
:func:`schedule_config`        the stage controller's :class:`~qat_jax.train.stages.ScheduleConfig`
:func:`loss_config`            the train step's :class:`~qat_jax.train.steps.LossConfig`
:func:`create_model`           the configured model of the zoo (method options applied)
:func:`binary_layers`          the quantizable layers the schedule binarizes (``quant.fp_kinds``)
:func:`create_controller`      the stage controller over those layers (no stages for ``fp``)
:func:`create_optimizer`       Adam on a learning-rate schedule, optional gradient clip
:func:`create_train_state`     the host train state at step 0 (FP-phase freeze mask)
=============================  ================================================================

The method (``config.method``, :mod:`qat_jax.train.methods`) can override config keys: its
granularity, activation gradient and transform, and it can switch model options on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from qat_jax import interop
from qat_jax import layers as qlayers
from qat_jax import models as qmodels
from qat_jax.config_checks import ConfigError, check_numbers, is_int
from qat_jax.models.common import LAYER_KINDS
from qat_jax.train import calibrate, parallel, schedules
from qat_jax.train.methods import method_settings
from qat_jax.train.stages import ScheduleConfig, StageController
from qat_jax.train.state import TrainState, split_variables
from qat_jax.train.steps import LossConfig
from qat_jax.tree import map_with_path

__all__ = [
    "ConfigError",
    "LAYER_KINDS",
    "validate_config",
    "quant_config",
    "variables_quant_config",
    "schedule_config",
    "loss_config",
    "create_model",
    "fp_kinds",
    "binary_layers",
    "create_controller",
    "create_optimizer",
    "create_train_state",
]


# ---------------------------------------------------------------------------------------------
# Config -> static objects


def quant_config(config: ml_collections.ConfigDict) -> qlayers.QuantConfig:
    """The binary layers' :class:`~qat_jax.layers.QuantConfig` of ``config`` and its method."""
    settings = method_settings(config.method)
    q = config.quant
    return qlayers.QuantConfig(
        transform=settings.transform,
        weight_clip=None if q.weight_clip is None or q.weight_clip <= 0 else float(q.weight_clip),
        act_grad=settings.act_grad or q.act_grad,
        binarize_input=True,
        normalize_c=True,
    )


def variables_quant_config(quant_vars: Mapping) -> qlayers.QuantConfig:
    """The forward :class:`~qat_jax.layers.QuantConfig` of one layer from its ``quant``
    variables: the transform is on when the layer has one (``P``). For reading a layer's binary
    weights back from saved variables (the export); gradient options keep their defaults."""
    return qlayers.QuantConfig(transform="P" in quant_vars)


def schedule_config(config: ml_collections.ConfigDict) -> ScheduleConfig:
    """The stage controller's :class:`~qat_jax.train.stages.ScheduleConfig` (``config.schedule``
    with the method's granularity and transform training)."""
    settings = method_settings(config.method)
    s = config.schedule
    return ScheduleConfig(
        granularity=settings.granularity or s.granularity,
        steps_per_stage=int(s.steps_per_stage),
        final_steps=int(s.final_steps),
        total_stage_steps=int(s.total_stage_steps),
        train_transform=settings.train_transform and bool(config.quant.train_transform),
        final_train_latent=bool(s.final_train_latent),
        acts_first_steps=int(s.get("acts_first_steps", 0)),
    )


def loss_config(config: ml_collections.ConfigDict, fp_phase: bool = False) -> LossConfig:
    """The train step's :class:`~qat_jax.train.steps.LossConfig` (``config.loss``).

    ``fp_phase=True``: the FP phase's, cross-entropy only (no teacher, no info loss).
    """
    cfg = LossConfig(
        label_smoothing=float(config.loss.label_smoothing),
        kd_weight=float(config.loss.kd_weight),
        kd_temperature=float(config.loss.kd_temperature),
        info_weight=float(config.loss.info_weight),
    )
    return dataclasses.replace(cfg, kd_weight=0.0, info_weight=0.0) if fp_phase else cfg


def create_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    qcfg: qlayers.QuantConfig | None = None,
    bn_axis_name: str | None = None,
):
    """The configured model (``config.model``: ``name`` plus that model's constructor args).

    ``qcfg`` defaults to :func:`quant_config` of ``config``. The method can switch model options
    on (never off): ``rprelu`` and, on the models that have it (MobileNetV2),
    ``binary_shortcut`` for ``reactnet``.
    """
    if qcfg is None:
        qcfg = quant_config(config)
    kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    for key in ("inverted_residual_setting",):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(tuple(int(v) for v in row) for row in kwargs[key])
        elif key in kwargs:
            del kwargs[key]
    if "dtype" in kwargs:
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    settings = method_settings(config.method)
    if settings.rprelu:
        kwargs["rprelu"] = True
    if settings.shortcut and qmodels.has_option(config.model.name, "binary_shortcut"):
        kwargs["binary_shortcut"] = True  # OR-ed with config.model.binary_shortcut
    return qmodels.create_model(
        config.model.name, num_classes=num_classes, quant=qcfg, bn_axis_name=bn_axis_name, **kwargs
    )


def fp_kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``quant.fp_kinds``, checked against :data:`LAYER_KINDS`."""
    kinds = tuple(config.quant.get("fp_kinds", ()) or ())
    unknown = [k for k in kinds if k not in LAYER_KINDS]
    if unknown:
        raise ConfigError(
            f"quant.fp_kinds has unknown layer kinds {unknown}; choose from {LAYER_KINDS}"
        )
    return kinds


def binary_layers(config: ml_collections.ConfigDict, layers: Sequence) -> list:
    """The quantizable layers the schedule binarizes: all but the kinds in ``quant.fp_kinds``."""
    kinds = fp_kinds(config)
    kept = [q for q in layers if q.kind not in kinds]
    if not kept:
        raise ConfigError(f"quant.fp_kinds={kinds} leaves no layer to binarize")
    return kept


def create_controller(
    config: ml_collections.ConfigDict, layers: Sequence, qat_start: int = 0
) -> StageController:
    """The stage controller over ``layers`` (:func:`binary_layers`) whose QAT starts at step
    ``qat_start``; for a method that does not quantize (``fp``) a schedule with no stages whose
    FP phase (``qat_start`` steps) is the whole run (:meth:`StageController.fp_only`)."""
    if not method_settings(config.method).quantize:
        return StageController.fp_only(qat_start)
    return StageController(
        [(q.path, q.block_id) for q in layers], schedule_config(config), qat_start=qat_start
    )


def create_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam with the learning rate ``schedule`` (``qat_jax.train.schedules``), optional clip and
    decoupled weight decay.

    ``cfg``: ``config.fp`` or ``config.optim``. ``grad_clip`` > 0 clips the global norm.
    ``weight_decay`` > 0 makes it AdamW on the conv/dense kernels only (``params/**/kernel``:
    the latent weights of binary layers and the FP layers' weights; BN, biases, thresholds and
    transforms are not decayed): each step also subtracts ``lr * weight_decay * kernel``. A
    frozen kernel is not decayed (the trainer multiplies every update by the freeze mask).
    ``weight_decay = 0`` is plain Adam, with Adam's optimizer state.
    """
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    wd = float(cfg.get("weight_decay", 0.0) or 0.0)
    if wd > 0:
        parts.append(optax.adamw(schedule, weight_decay=wd, mask=_kernel_mask))
    else:
        parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def _kernel_mask(params):
    """``True`` at every ``kernel`` leaf under ``params`` (what weight decay applies to)."""
    return map_with_path(lambda path, _: path[0] == "params" and path[-1] == "kernel", params)


def create_train_state(variables: Mapping, tx: optax.GradientTransformation) -> TrainState:
    """The host (numpy) train state at step 0 of initialised ``variables``.

    Its freeze mask is the FP phase's: latent weights, BN, stem and classifier (``params``)
    train; quantizer variables (``quant``) do not. ``tx`` creates the optimizer state.
    """
    trainable, state_vars = split_variables(variables)
    mask0 = map_with_path(lambda path, _: np.float32(path[0] == "params"), trainable)
    hstate = TrainState(
        step=np.asarray(0, np.int32),
        params=trainable,
        state=state_vars,
        opt_state=tx.init(trainable),
        mask=mask0,
    )
    return parallel.to_numpy(hstate)


# ---------------------------------------------------------------------------------------------
# Validation: the schedule on the model's layers and the names (the numeric keys: config_checks)


def _check_stage_count(config) -> None:
    """The schedule on the model's layers (counted without compute, from a traced init)."""
    # The classifier is FP: its width does not change the binary layers.
    model = create_model(config, num_classes=2)
    size = int(config.dataset.get("image_size") or 32)
    layers = binary_layers(config, qmodels.traced_quantizable_layers(model, (1, size, size, 3)))
    sched = schedule_config(config)
    try:
        # Without the shared budget, to count the stages that would share it.
        controller = StageController(
            [(q.path, q.block_id) for q in layers],
            dataclasses.replace(sched, total_stage_steps=0),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n = controller.num_stages - controller.lead  # the acts-first stage has its own budget
    if 0 < sched.total_stage_steps < n:
        raise ConfigError(
            f"--config.schedule.total_stage_steps={sched.total_stage_steps}: fewer than the {n} "
            f"stages of this schedule ({sched.granularity} granularity on {len(layers)} binary "
            f"layers): set 0 (steps_per_stage each) or at least {n}"
        )


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail fast, with the fix in a one-line :class:`ConfigError`, on configs that cannot run.

    Checks every numeric key (ranges, finiteness), the names (method, schedule, granularity,
    layer kinds), the batch sizes against ``num_devices`` (all devices of all processes), the
    init checkpoint's existence and, for quantizing methods, the schedule on the model's layers
    (e.g. ``total_stage_steps`` of at least one step per stage). Nothing is computed: the
    model's layers come from a traced init.
    """
    try:
        settings = method_settings(config.method)
    except ValueError as e:
        raise ConfigError(f"{e} (--config.method)") from None
    check_numbers(config)
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if not is_int(value) or value <= 0 or value % num_devices:
            raise ConfigError(
                f"{key}={value} must be a positive multiple of the "
                f"{num_devices} devices: set --config.{key}"
            )
    if config.init == "train_fp" and config.fp.steps <= 0:
        raise ConfigError(
            "init='train_fp' needs fp.steps > 0 (or set --config.init to a checkpoint)"
        )
    init_file = interop.is_torch_checkpoint(config.init) and os.path.isfile(config.init)
    if config.init != "train_fp" and not (os.path.isdir(os.path.abspath(config.init)) or init_file):
        raise ConfigError(
            f"init checkpoint {config.init!r} does not exist: pass the directory of a saved FP "
            "model (e.g. <workdir>/teacher of an earlier run), a torchvision-layout .pth/"
            ".safetensors file, or --config.init=train_fp"
        )
    fp_kinds(config)
    if config.optim.get("schedule", "global") not in schedules.SCHEDULES:
        raise ConfigError(
            f"optim.schedule must be one of {schedules.SCHEDULES}, got "
            f"{config.optim.schedule!r}: set --config.optim.schedule"
        )
    if config.schedule.get("bn_estimate", "pooled") not in calibrate.BN_ESTIMATES:
        raise ConfigError(
            f"--config.schedule.bn_estimate={config.schedule.bn_estimate!r}: must be one of "
            f"{calibrate.BN_ESTIMATES}"
        )
    if config.quant.get("act_grad", "approx") not in ("approx", "ste"):
        raise ConfigError(
            f"--config.quant.act_grad={config.quant.act_grad!r}: must be 'approx' or 'ste'"
        )
    if config.quant.get("tau_init", "mean") not in ("mean", "zero"):
        raise ConfigError(
            f"--config.quant.tau_init={config.quant.tau_init!r}: must be 'mean' or 'zero'"
        )
    if settings.quantize:
        try:
            schedule_config(config).validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_stage_count(config)
