"""Learning-rate schedules of the FP and QAT optimizers (pure functions of the optimizer's count).

* ``'global'``: one warmup + cosine decay over all QAT steps (and over the FP phase);
* ``'per_stage'``: the same warmup + cosine restarted at the start of every stage and of the final
  phase (:func:`per_stage_schedule`), built from the stage boundaries of the
  :class:`~qat_jax.train.stages.StageController`.

The QAT optimizer state is created fresh when QAT starts
(:meth:`qat_jax.train.boundaries.Boundaries.start_qat`) and is saved with every checkpoint, so its
step count is ``global step - qat_start`` at every QAT step, also after a resume: the schedule
needs nothing but that count, and one compiled train step serves every stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

__all__ = [
    "SCHEDULES",
    "warmup_cosine",
    "per_stage_schedule",
    "stage_segments",
    "qat_schedule",
    "schedule_count",
]

SCHEDULES = ("global", "per_stage")


def warmup_cosine(
    learning_rate: float, warmup_steps: int, final_lr_fraction: float, total_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` (none when ``warmup_steps == 0``), then cosine
    decay to ``learning_rate * final_lr_fraction`` at ``total_steps``; the warmup is capped at
    ``total_steps - 1`` so that every segment reaches its peak."""
    warmup = min(int(warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=learning_rate * final_lr_fraction,
    )


def per_stage_schedule(
    segments: Sequence[int], learning_rate: float, warmup_steps: int, final_lr_fraction: float
) -> optax.Schedule:
    """:func:`warmup_cosine` restarted at every segment: ``segments`` are the step counts of the
    consecutive segments (stages, then the final phase); empty segments are skipped. At count
    ``c`` in segment ``i`` (which starts at ``sum(segments[:i])``) the value is
    ``warmup_cosine(..., segments[i])(c - start_i)``; past the last segment it stays at the end
    value."""
    lengths = [int(n) for n in segments if int(n) > 0]
    if not lengths:
        raise ValueError("per_stage_schedule needs at least one non-empty segment")
    parts = [warmup_cosine(learning_rate, warmup_steps, final_lr_fraction, n) for n in lengths]
    boundaries, start = [], 0
    for n in lengths[:-1]:
        start += n
        boundaries.append(start)
    return optax.join_schedules(parts, boundaries) if len(parts) > 1 else parts[0]


def stage_segments(controller) -> list[int]:
    """Step counts of the controller's stages and final phase (the QAT steps, in order)."""
    starts = [controller.stage_start(k) for k in range(controller.final_index + 1)]
    ends = starts[1:] + [controller.total_steps]
    return [b - a for a, b in zip(starts, ends, strict=True)]


def qat_schedule(optim_cfg, controller, qat_steps: int) -> optax.Schedule:
    """The QAT learning rate as a function of the QAT optimizer's count (``optim.schedule``)."""
    kind = optim_cfg.get("schedule", "global")
    if kind == "global" or controller is None or not controller.quantizes:
        return warmup_cosine(
            optim_cfg.learning_rate,
            optim_cfg.warmup_steps,
            optim_cfg.final_lr_fraction,
            max(qat_steps, 1),
        )
    if kind == "per_stage":
        return per_stage_schedule(
            stage_segments(controller),
            optim_cfg.learning_rate,
            optim_cfg.warmup_steps,
            optim_cfg.final_lr_fraction,
        )
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")


def schedule_count(opt_state) -> jax.Array:
    """The step count of the (first) ``scale_by_schedule`` state in ``opt_state``: the count the
    learning-rate schedule of ``optax.adam(schedule)`` is evaluated at for the next update."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    for leaf in jax.tree.leaves(opt_state, is_leaf=is_sched):
        if is_sched(leaf):
            return leaf.count
    raise ValueError("the optimizer state has no learning-rate schedule (ScaleByScheduleState)")
