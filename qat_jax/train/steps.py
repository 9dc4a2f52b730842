"""Pure per-device step functions; :mod:`qat_jax.train.parallel` maps them over devices.

Each function sees one device's shard of the global batch and reduces over
:data:`qat_jax.train.parallel.AXIS` with ``lax.pmean``/``lax.psum``. None of them knows the
schedule: layer modes live in ``state.state['qstate']`` and the freeze mask in ``state.mask``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from qat_jax import layers as qlayers
from qat_jax.train import losses, schedules
from qat_jax.train.parallel import AXIS
from qat_jax.train.state import TrainState

__all__ = [
    "LossConfig",
    "make_train_step",
    "eval_step",
    "input_stats_step",
    "bn_step",
]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss options (hashable: part of the compiled step)."""

    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    info_weight: float = 0.0


def _leaf_masks(mask) -> jax.Array:
    """The freeze mask's leaves stacked: one 0/1 scalar per trainable leaf."""
    leaves = jax.tree.leaves(mask)
    shaped = [jnp.shape(m) for m in leaves if jnp.ndim(m)]
    if shaped:
        raise ValueError(
            f"state.mask must hold one 0/1 scalar per trainable leaf (what the stage controller "
            f"builds); got leaves of shapes {shaped[:3]}"
        )
    return jnp.stack([jnp.asarray(m, jnp.float32) for m in leaves] or [jnp.zeros(())])


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: LossConfig,
    lr_schedule: optax.Schedule | None = None,
    teacher_model: nn.Module | None = None,
):
    """Build ``train_step(state, batch, rng, teacher) -> (state, metrics)`` (per device).

    * loss = CE (+ label smoothing) + ``kd_weight`` * KD(teacher) + ``info_weight`` * info loss;
    * gradients are averaged over devices, multiplied by ``state.mask``; the optimizer's updates
      are multiplied by the mask again, so a frozen leaf stays bit-identical even under Adam
      momentum;
    * a step whose loss or gradients are not finite (a gradient's square overflowing float32
      counts as not finite) leaves the state unchanged and reports ``nonfinite = 1`` (the
      trainer stops at the next log);
    * the info-loss term is computed (and reported as ``info``) only when ``info_weight > 0``;
      otherwise the metric is 0 and the binarizing layers skip its products with ``C``;
    * diagnostics: ``grad_norm`` is the norm of the masked gradients (what the optimizer sees),
      ``grad_norm_trainable`` / ``grad_norm_frozen`` split the device-averaged gradient *before*
      the mask into its trainable (mask 1) and frozen (mask 0) leaves, so
      ``trainable**2 + frozen**2`` is its squared norm; with ``lr_schedule`` (the schedule inside
      ``tx``), ``lr`` is its value at the optimizer's count, the learning rate of this update.

    ``batch``: ``{'image': [b, H, W, C] float32, 'label': [b] int32}``. ``teacher``: FP variables
    of the teacher model, or ``None`` (then ``kd_weight`` must be 0). ``teacher_model`` runs
    them (default: ``model``); the trainer passes :func:`qat_jax.models.static_fp` of ``model``,
    which computes the same logits from FP variables without compiling the binary paths.
    """

    teacher_model = model if teacher_model is None else teacher_model
    # Binarizing layers compute the info-loss term only when ``losses`` is mutable: ask for it
    # only when it is weighted (it is not free: two products with ``C`` per layer and step).
    mutable = ["batch_stats", "losses"] if cfg.info_weight else ["batch_stats"]

    def train_step(state: TrainState, batch, rng, teacher):
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
        images, labels = batch["image"], batch["label"]
        teacher_logits = None
        if cfg.kd_weight and teacher is not None:
            teacher_logits = teacher_model.apply(teacher, images, train=False)

        def loss_fn(params):
            logits, new_vars = model.apply(
                {**params, **state.state},
                images,
                train=True,
                mutable=mutable,
                rngs={"dropout": rng},
            )
            ce = jnp.mean(losses.cross_entropy(logits, labels, cfg.label_smoothing))
            kd = (
                jnp.mean(losses.distillation(logits, teacher_logits, cfg.kd_temperature))
                if teacher_logits is not None
                else jnp.zeros((), jnp.float32)
            )
            info = losses.info_loss(new_vars.get("losses", {}))
            loss = ce + cfg.kd_weight * kd + cfg.info_weight * info
            aux = {
                "batch_stats": new_vars.get("batch_stats", {}),
                "metrics": {
                    "loss": loss,
                    "ce": ce,
                    "kd": kd,
                    "info": info,
                    "accuracy": jnp.mean(losses.correct(logits, labels)),
                },
            }
            return loss, aux

        grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = lax.pmean(grads, AXIS)
        # One sum of squares per leaf serves the finiteness check and the norms (the mask is a
        # 0/1 scalar per leaf). Every per-leaf reduction and select is a kernel of its own that
        # XLA compiles: three norms, a finiteness reduction and a select per leaf took a third
        # of the step's compile time on XLA:CPU (docs/performance.md).
        sq = jnp.stack(
            [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)]
            or [jnp.zeros(())]  # no trainable leaf: nothing to check
        )
        m = _leaf_masks(state.mask)
        sq_trainable, sq_frozen = jnp.sum(sq * m), jnp.sum(sq * (1 - m))
        grads = jax.tree.map(lambda g, m: g * m.astype(g.dtype), grads, state.mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, state.mask)
        params = optax.apply_updates(state.params, updates)
        batch_stats = lax.pmean(aux["batch_stats"], AXIS)
        metrics = lax.pmean(aux["metrics"], AXIS)

        # Finite iff every gradient entry is (a square overflowing float32, |g| > 1.8e19, counts
        # as non-finite too). A non-finite step keeps the old state: one cond, not a select per leaf.
        ok = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.isfinite(sq))
        new = (params, opt_state, batch_stats)
        old = (state.params, state.opt_state, state.state["batch_stats"])
        params, opt_state, batch_stats = lax.cond(ok, lambda: new, lambda: old)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            state={**state.state, "batch_stats": batch_stats},
        )
        metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
        metrics["grad_norm"] = jnp.sqrt(sq_trainable)
        # Diagnostics only: nothing above reads them.
        metrics["grad_norm_trainable"] = jnp.sqrt(sq_trainable)
        metrics["grad_norm_frozen"] = jnp.sqrt(sq_frozen)
        if lr_schedule is not None:
            count = schedules.schedule_count(state.opt_state)
            metrics["lr"] = jnp.asarray(lr_schedule(count), jnp.float32)
        return new_state, metrics

    return train_step


def eval_step(model: nn.Module, variables, batch) -> dict:
    """Sums over the global batch: ``correct``, ``loss`` and ``count`` (``mask`` drops padding)."""
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    sums = {
        "correct": jnp.sum(losses.correct(logits, batch["label"]) * mask),
        "loss": jnp.sum(losses.cross_entropy(logits, batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return lax.psum(sums, AXIS)


def input_stats_step(model: nn.Module, variables, images) -> dict:
    """Input statistics of every binary layer (:data:`qat_jax.layers.INPUT_STATS`), summed over
    the global batch: what calibration and the activation diagnostics read.

    Layers whose :data:`qat_jax.layers.RECORD_XXT` switch is 1 also return ``xxT`` (second moment
    of their input patches).
    """
    _, new_vars = model.apply(variables, images, train=False, mutable=[qlayers.INPUT_STATS])
    return lax.psum(new_vars[qlayers.INPUT_STATS], AXIS)


def bn_step(model: nn.Module, variables, images, base: float = 0.0) -> dict:
    """Running BN statistics after one train-mode pass from ``batch_stats`` filled with ``base``.

    Flax's BN updates ``new = m * old + (1 - m) * batch_stat``. With ``base = 0`` this returns
    ``(1 - m) * batch_stat``; comparing ``base = 0`` and ``base = 1`` measures ``m``. Used for BN
    re-estimation (:mod:`qat_jax.train.calibrate`). Averaged over devices. ``base`` may be traced
    (map it with ``in_axes=None``): then both values share one compiled program.
    """
    filled = jax.tree.map(lambda x: jnp.full_like(x, base), variables["batch_stats"])
    _, new_vars = model.apply(
        {**variables, "batch_stats": filled},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(0)},
    )
    return lax.pmean(new_vars["batch_stats"], AXIS)
