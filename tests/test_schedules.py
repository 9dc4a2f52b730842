"""Learning-rate schedules: 'global' unchanged, 'per_stage' restarted at every stage boundary."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from qat_jax.experiment import create_optimizer
from qat_jax.train import schedules
from qat_jax.train.stages import ScheduleConfig, StageController

LAYERS = [
    (("b0", "expand"), 0),
    (("b0", "dw"), 0),
    (("b1", "expand"), 1),
    (("head",), 2),
]


def _optim(schedule="per_stage", lr=2e-3, warmup=3, frac=0.05):
    c = ml_collections.ConfigDict()
    c.learning_rate = lr
    c.warmup_steps = warmup
    c.final_lr_fraction = frac
    c.grad_clip = 0.0
    c.schedule = schedule
    return c


def _old_global(cfg, total_steps):
    """The QAT schedule as the trainer built it before ``optim.schedule`` existed."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )


def _closed_form(t, length, lr, warmup, frac):
    """Warmup + cosine of one segment at local step ``t`` (numpy, from the formula)."""
    w = min(warmup, max(length - 1, 0))
    end = lr * frac
    if t < w:
        return lr * t / w
    t = min(t, length)
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * (t - w) / (length - w)))


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("total", [0, 45])
def test_global_schedule_is_unchanged(warmup, total):
    ctrl = StageController(
        LAYERS, ScheduleConfig("block", 10, final_steps=5, total_stage_steps=total), 7
    )
    cfg = _optim("global", warmup=warmup)
    qat_steps = ctrl.total_steps - 7
    new = schedules.qat_schedule(cfg, ctrl, qat_steps)
    old = _old_global(cfg, qat_steps)
    counts = jnp.arange(qat_steps + 3)
    np.testing.assert_array_equal(np.asarray(new(counts)), np.asarray(old(counts)))
    # A config without the key (an older config file) gets the same.
    del cfg["schedule"]
    np.testing.assert_array_equal(
        np.asarray(schedules.qat_schedule(cfg, ctrl, qat_steps)(counts)), np.asarray(old(counts))
    )


@pytest.mark.parametrize("acts_first", [0, 4])
@pytest.mark.parametrize("warmup", [0, 3])
def test_per_stage_schedule_restarts_at_every_stage(acts_first, warmup):
    lr, frac = 2e-3, 0.05
    sched_cfg = ScheduleConfig("block", 10, final_steps=6, acts_first_steps=acts_first)
    ctrl = StageController(LAYERS, sched_cfg, qat_start=50)
    starts = [ctrl.stage_start(k) - 50 for k in range(ctrl.final_index + 1)]
    ends = starts[1:] + [ctrl.total_steps - 50]
    assert schedules.stage_segments(ctrl) == [b - a for a, b in zip(starts, ends, strict=True)]
    f = schedules.qat_schedule(_optim(warmup=warmup, lr=lr, frac=frac), ctrl, ends[-1])
    for a, b in zip(starts, ends, strict=True):
        # warmup start (0) or the peak at the stage's first step; the peak after the warmup.
        assert float(f(a)) == pytest.approx(0.0 if warmup else lr, rel=1e-6, abs=1e-12)
        assert float(f(a + warmup)) == pytest.approx(lr, rel=1e-6)
        # decays monotonically after the warmup, to lr * final_lr_fraction at the stage's end
        # (where the next stage restarts: the segment's own schedule reaches it there).
        vals = [float(f(c)) for c in range(a + min(warmup, b - a - 1), b)]
        assert all(x > y for x, y in zip(vals, vals[1:], strict=False))
        seg = schedules.warmup_cosine(lr, warmup, frac, b - a)
        assert float(seg(b - a)) == pytest.approx(lr * frac, rel=1e-6)
        for t in range(b - a):
            expect = _closed_form(t, b - a, lr, warmup, frac)
            assert float(f(a + t)) == pytest.approx(expect, rel=1e-5, abs=1e-9), (a, t)
    # Past the final phase it stays at the end value.
    assert float(f(ends[-1])) == pytest.approx(lr * frac, rel=1e-6)
    assert float(f(ends[-1] + 10)) == pytest.approx(lr * frac, rel=1e-6)


def test_per_stage_schedule_skips_empty_final_phase():
    f = schedules.per_stage_schedule([4, 4, 0], 1.0, 0, 0.0)
    assert float(f(0)) == pytest.approx(1.0) and float(f(4)) == pytest.approx(1.0)
    assert float(f(8)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        schedules.per_stage_schedule([0], 1.0, 0, 0.0)


def test_optimizer_uses_its_schedule_at_its_count():
    """Adam through ``create_optimizer`` (with a clip in front): the update at count ``c`` is
    ``-schedule(c)`` (a constant gradient makes Adam's direction +-1), and
    :func:`schedules.schedule_count` reads that count."""
    f = schedules.per_stage_schedule([2, 3], 1.0, 0, 0.1)
    cfg = _optim()
    cfg.grad_clip = 10.0
    tx = create_optimizer(cfg, f)
    params = {"w": jnp.ones((3,), jnp.float32)}
    state = tx.init(params)
    for c in range(5):
        assert int(schedules.schedule_count(state)) == c
        updates, state = tx.update({"w": jnp.full((3,), 0.5, jnp.float32)}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -float(f(c)), rtol=1e-4)
    assert float(f(2)) == pytest.approx(1.0)  # the restart is what the optimizer saw at c = 2
    with pytest.raises(ValueError, match="schedule"):
        schedules.schedule_count(optax.adam(0.1).init(params))


def test_unknown_schedule_is_rejected():
    ctrl = StageController(LAYERS, ScheduleConfig("block", 10), 0)
    with pytest.raises(ValueError, match="optim.schedule"):
        schedules.qat_schedule(_optim("cosine"), ctrl, 30)


def test_weight_decay_decays_only_kernels_and_zero_is_plain_adam():
    """AdamW (decoupled) on ``params/**/kernel``: with a zero gradient Adam's step is 0 and the
    update is exactly ``-lr * wd * kernel``; BN scales, biases and quantizer variables stay."""
    lr, wd = 0.1, 0.5
    params = {
        "params": {
            "conv": {"kernel": jnp.full((2, 3), 2.0, jnp.float32)},
            "bn": {"scale": jnp.ones((3,), jnp.float32), "bias": jnp.ones((3,), jnp.float32)},
        },
        "quant": {"conv": {"tau": jnp.ones((2,), jnp.float32)}},
    }
    cfg = _optim()
    cfg.weight_decay = wd
    tx = create_optimizer(cfg, lambda count: lr)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    np.testing.assert_allclose(updates["params"]["conv"]["kernel"], -lr * wd * 2.0, rtol=1e-6)
    for path in (("params", "bn", "scale"), ("params", "bn", "bias"), ("quant", "conv", "tau")):
        leaf = updates
        for k in path:
            leaf = leaf[k]
        assert not np.any(np.asarray(leaf)), path
    # weight_decay = 0: Adam itself (the optimizer state of checkpoints written without it).
    cfg.weight_decay = 0.0
    plain = create_optimizer(cfg, lambda count: lr).init(params)
    adam = optax.chain(optax.adam(lambda count: lr)).init(params)
    assert jax.tree.structure(plain) == jax.tree.structure(adam)
