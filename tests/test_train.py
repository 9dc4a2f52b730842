"""Train steps: loss terms, freezing, parity of the pmapped step across device counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numerics import assert_close_to_scale

from qat_jax.layers import BINARIZING, QuantConfig
from qat_jax.models import MobileNetV2, init_variables, quantizable_layers, static_fp
from qat_jax.train import losses, steps
from qat_jax.train.parallel import AXIS
from qat_jax.train.stages import ScheduleConfig, StageController
from qat_jax.train.state import TrainState, split_variables
from qat_jax.tree import map_with_path, set_path

SETTING = ((1, 8, 1, 1), (2, 8, 1, 2))
# Tests of the step's mechanics (device parity, freezing, the NaN guard, metrics) that do not
# need the transform run the binarizing branch without it: it halves the step's XLA compile
# (the Cayley solves in every layer's branches dominate it), and the transform's own gradients
# are tested in test_kd_and_info_terms_add_their_gradients and tests/test_layers.py.
NO_TRANSFORM = QuantConfig(transform=False)


def _model(**kw):
    return MobileNetV2(
        variant="cifar",
        num_classes=10,
        width_mult=0.25,
        dropout_rate=0.0,
        inverted_residual_setting=SETTING,
        last_channel=16,
        bn_axis_name=AXIS,
        **kw,
    )


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 16, 16, 1)).astype(np.float32),
        "label": rng.integers(0, 10, size=(n,)).astype(np.int32),
    }


def _state(model, tx, binarize=True, seed=0):
    variables = init_variables(model, jax.random.PRNGKey(seed), (1, 16, 16, 1))
    trainable, st = split_variables(variables)
    layers = quantizable_layers(variables)
    if binarize:  # quantize the first block
        for q in layers[:2]:
            st = set_path(st, ("qstate", *q.path, "w_mode"), np.int32(BINARIZING))
            st = set_path(st, ("qstate", *q.path, "a_mode"), np.int32(1))
            # A threshold inside the ReLU6 range: with tau = 0 every input would be +1 (ReLU6 is
            # >= 0 and sign(0) = +1), BN variances would collapse to rounding noise and nothing
            # would be testable.
            tau = trainable["quant"][q.path[0]][q.path[1]]["tau"]
            trainable = set_path(trainable, ("quant", *q.path, "tau"), np.full_like(tau, 0.3))
    mask = map_with_path(lambda p, _: np.float32(1.0), trainable)
    return TrainState(
        step=np.int32(0), params=trainable, state=st, opt_state=tx.init(trainable), mask=mask
    ), layers


def _pmapped(fn, n_dev):
    return jax.pmap(fn, axis_name=AXIS, devices=jax.local_devices()[:n_dev])


def _rep(tree, n):
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def _split(batch, n):
    return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)


def _grads(model, state, batch, cfg, teacher=None):
    """Gradient of the full train loss through a one-device pmapped train step with SGD(lr=1)."""
    tx = optax.sgd(1.0)
    st = state.replace(opt_state=tx.init(state.params))
    step = _pmapped(lambda s, b, r, t: steps.make_train_step(model, tx, cfg)(s, b, r, t), 1)
    new, _ = step(_rep(st, 1), _split(batch, 1), _rep(jax.random.PRNGKey(0), 1), teacher)
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b)[0], st.params, new.params)


@pytest.mark.slow
def test_kd_and_info_terms_add_their_gradients():
    model = _model()
    state, _ = _state(model, optax.sgd(1.0))
    batch = _batch(8)
    teacher_state, _ = _state(model, optax.sgd(1.0), binarize=False, seed=1)
    teacher = _rep(teacher_state.variables, 1)
    g_ce = _grads(model, state, batch, steps.LossConfig())
    g_kd = _grads(model, state, batch, steps.LossConfig(kd_weight=0.7, kd_temperature=2.0), teacher)
    g_info = _grads(model, state, batch, steps.LossConfig(info_weight=0.3))

    # The same terms computed directly with jax.grad (BN in train mode, batch statistics).
    model_local = _model().clone(bn_axis_name=None)

    def term_local(params, which):
        variables = {**params, **state.state}
        logits, new = model_local.apply(
            variables, batch["image"], train=True, mutable=["batch_stats", "losses"]
        )
        if which == "kd":
            t_logits = model_local.apply(teacher_state.variables, batch["image"], train=False)
            return jnp.mean(losses.distillation(logits, t_logits, 2.0))
        return losses.info_loss(new["losses"])

    # Jitted: one compile each instead of one per primitive of an eager grad.
    grad_local = jax.jit(jax.grad(term_local), static_argnums=1)
    d_kd = grad_local(state.params, "kd")
    d_info = grad_local(state.params, "info")
    info_value = float(jax.jit(term_local, static_argnums=1)(state.params, "info"))
    assert info_value > 0.05  # binarizing layers have a real binarization error

    for got, base, extra, w in ((g_kd, g_ce, d_kd, 0.7), (g_info, g_ce, d_info, 0.3)):
        flat_got = jax.tree.leaves(got)
        flat_expect = jax.tree.leaves(
            jax.tree.map(lambda b, e, w=w: b + w * np.asarray(e), base, extra)
        )
        # The pmapped step's gradient vs a local recomputation of each term: another reduction
        # order through the whole backward pass. The rounding of a leaf comes from the terms it
        # is summed from, not from its own size (a leaf whose true gradient is ~0 carries the
        # noise of the large terms that cancel in it), so the bound scales with the largest
        # gradient of the whole tree.
        scale = max(float(np.abs(b).max()) for b in flat_expect)
        for a, b in zip(flat_got, flat_expect, strict=True):
            assert_close_to_scale(a, b, 2e-3, scale=scale)
    # And the extra terms are not zero (the test would pass trivially otherwise).
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(d_kd)) > 1e-4
    assert float(np.abs(d_info["quant"]["block0"]["depthwise"]["rho"]).max()) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("binarize", [False, True])
def test_pmapped_step_matches_one_device(binarize):
    """8 devices x 2 examples == 1 device x 16 examples (BN statistics synchronised)."""
    assert jax.local_device_count() >= 8
    model = _model(quant=NO_TRANSFORM)
    # SGD: Adam's normalisation would amplify float rounding of near-zero gradients.
    tx = optax.sgd(0.1, momentum=0.9)
    state, _ = _state(model, tx, binarize=binarize)
    fn = steps.make_train_step(model, tx, steps.LossConfig())
    outs = []
    for n in (1, 8):
        step = _pmapped(fn, n)
        s = _rep(state, n)
        for i in range(2):
            s, metrics = step(
                s, _split(_batch(16, seed=i), n), _rep(jax.random.PRNGKey(0), n), None
            )
        outs.append((jax.tree.map(lambda x: np.asarray(x)[0], s), metrics))
    (s1, m1), (s8, m8) = outs
    np.testing.assert_allclose(np.asarray(m1["loss"])[0], np.asarray(m8["loss"])[0], rtol=1e-5)
    pairs = list(zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True))
    pairs += list(
        zip(
            jax.tree.leaves(s1.state["batch_stats"]),
            jax.tree.leaves(s8.state["batch_stats"]),
            strict=True,
        )
    )
    # Means over 8 devices x 2 vs 1 x 16 examples: float32 sums in another order, through two SGD
    # steps. As for gradients above, a leaf's rounding comes from the sums that produce it (a
    # threshold whose gradient is ~0 moves by noise only), so the bound is relative to the
    # largest value of its tree (params, or BN statistics).
    for tree in (
        pairs[: len(jax.tree.leaves(s1.params))],
        pairs[len(jax.tree.leaves(s1.params)) :],
    ):
        scale = max(float(np.abs(b).max()) for _, b in tree)
        for a, b in tree:
            assert_close_to_scale(a, b, 1e-4, scale=scale)


@pytest.mark.slow
def test_mask_freezes_leaves_bit_exactly_under_adam():
    model = _model(quant=NO_TRANSFORM)
    tx = optax.adam(1e-1)
    state, layers = _state(model, tx)
    ctrl = StageController([(q.path, q.block_id) for q in layers], ScheduleConfig("layer", 1), 0)
    fn = _pmapped(steps.make_train_step(model, tx, steps.LossConfig()), 1)
    s = _rep(state, 1)
    # Two steps with everything trainable (builds up Adam momentum), then freeze per stage 1.
    for i in range(2):
        s, _ = fn(s, _split(_batch(8, i), 1), _rep(jax.random.PRNGKey(0), 1), None)
    mask = ctrl.mask(1, state.params)
    s = s.replace(mask=_rep(mask, 1))
    before = jax.tree.map(lambda x: np.array(x[0]), s.params)
    for i in range(3):
        s, _ = fn(s, _split(_batch(8, 10 + i), 1), _rep(jax.random.PRNGKey(0), 1), None)
    after = jax.tree.map(lambda x: np.array(x[0]), s.params)
    frozen_kernel = ("params", *layers[0].path, "kernel")
    live_kernel = ("params", *layers[1].path, "kernel")

    def get(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    np.testing.assert_array_equal(get(before, frozen_kernel), get(after, frozen_kernel))
    assert not np.array_equal(get(before, live_kernel), get(after, live_kernel))


@pytest.mark.slow
def test_static_fp_teacher_gives_the_same_step():
    """The trainer runs the KD teacher with ``static_fp(model)``: the step's KD term, metrics and
    new state are those of the switched model's teacher pass (same FP variables, every mode 0)."""
    model = _model(rprelu=True, binary_shortcut=True)
    tx = optax.adam(1e-2)
    state, _ = _state(model, tx)
    teacher_state, _ = _state(model, tx, binarize=False, seed=1)
    teacher = _rep(teacher_state.variables, 1)
    cfg = steps.LossConfig(kd_weight=0.7, kd_temperature=2.0)
    out = {}
    for name, teacher_model in (("switched", None), ("static", static_fp(model))):
        fn = _pmapped(steps.make_train_step(model, tx, cfg, teacher_model=teacher_model), 1)
        out[name] = fn(
            _rep(state, 1), _split(_batch(8), 1), _rep(jax.random.PRNGKey(0), 1), teacher
        )
    (s_a, m_a), (s_b, m_b) = out["switched"], out["static"]
    assert float(m_a["kd"][0]) > 1e-3  # the teacher does matter
    assert float(m_b["kd"][0]) == pytest.approx(float(m_a["kd"][0]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s_a.params), jax.tree.leaves(s_b.params), strict=True):
        assert_close_to_scale(b, a, 1e-5)


@pytest.mark.slow
def test_static_fp_model_gives_the_fp_phase_step():
    """The trainer's FP-phase step runs ``static_fp(model)``: from FP variables (every mode 0) two
    steps give the switched model's parameters, Adam moments, BN statistics and metrics."""
    model = _model(rprelu=True, binary_shortcut=True)
    tx = optax.adam(1e-2)
    state, _ = _state(model, tx, binarize=False)
    cfg = steps.LossConfig(label_smoothing=0.1)
    out = {}
    for name, m in (("switched", model), ("static", static_fp(model))):
        fn = _pmapped(steps.make_train_step(m, tx, cfg), 2)
        s = _rep(state, 2)
        for i in range(2):
            s, metrics = fn(s, _split(_batch(8, 20 + i), 2), _rep(jax.random.PRNGKey(i), 2), None)
        out[name] = (s, metrics)
    (s_a, m_a), (s_b, m_b) = out["switched"], out["static"]
    assert float(m_b["loss"][0]) == pytest.approx(float(m_a["loss"][0]), rel=1e-6)
    assert float(m_b["grad_norm"][0]) == pytest.approx(float(m_a["grad_norm"][0]), rel=1e-5)
    moved = [
        np.abs(np.asarray(b) - np.asarray(a)).max()
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s_a.params), strict=True)
    ]
    assert max(moved) > 1e-3  # the steps did train
    for a, b in zip(
        jax.tree.leaves((s_a.params, s_a.opt_state, s_a.state)),
        jax.tree.leaves((s_b.params, s_b.opt_state, s_b.state)),
        strict=True,
    ):
        assert_close_to_scale(b, a, 1e-5)


@pytest.mark.slow
def test_nonfinite_step_leaves_state_unchanged():
    model = _model(quant=NO_TRANSFORM)
    tx = optax.adam(1e-2)
    state, _ = _state(model, tx)
    fn = _pmapped(steps.make_train_step(model, tx, steps.LossConfig()), 1)
    batch = _batch(8)
    batch["image"][0, 0, 0, 0] = np.nan
    s, metrics = fn(_rep(state, 1), _split(batch, 1), _rep(jax.random.PRNGKey(0), 1), None)
    assert float(np.asarray(metrics["nonfinite"])[0]) == 1.0
    # Everything the step would update: parameters, Adam's moments and count, BN statistics.
    kept = (state.params, state.opt_state, state.state["batch_stats"])
    now = (s.params, s.opt_state, s.state["batch_stats"])
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(now), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[0])
    assert int(np.asarray(s.step)[0]) == int(state.step) + 1  # the step is still counted


def test_train_step_rejects_a_mask_that_is_not_one_scalar_per_leaf():
    model = _model(quant=NO_TRANSFORM)
    tx = optax.adam(1e-2)
    state, _ = _state(model, tx)
    per_entry = jax.tree.map(lambda p: np.ones(np.shape(p), np.float32), state.params)
    fn = _pmapped(steps.make_train_step(model, tx, steps.LossConfig()), 1)
    with pytest.raises(ValueError, match="one 0/1 scalar per trainable leaf"):
        fn(
            _rep(state.replace(mask=per_entry), 1),
            _split(_batch(8), 1),
            _rep(jax.random.PRNGKey(0), 1),
            None,
        )


def test_quant_config_is_static_and_hashable():
    assert hash(QuantConfig()) == hash(QuantConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().transform = False  # type: ignore[misc]


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights():
    """``model.dtype=bfloat16``: convolutions compute in bfloat16, while parameters, optimizer
    state and BN statistics stay float32 through a BiTAT step, which tracks the float32 step."""
    tx = optax.adam(1e-3)
    models = {"f32": _model(), "bf16": _model(dtype=jnp.bfloat16)}
    state, _ = _state(models["bf16"], tx)  # block 0 binarizing with its transform
    conv_dtypes = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and type(context.module).__name__ == "BinaryConv":
            conv_dtypes.append(out.dtype)
        return out

    with nn.intercept_methods(record):  # records at trace time: dtypes are static
        logits = jax.jit(lambda v, x: models["bf16"].apply(v, x, train=False))(
            state.variables, _batch(2)["image"]
        )
    assert set(conv_dtypes) == {jnp.dtype(jnp.bfloat16)} and logits.dtype == jnp.float32

    out = {}
    for name, model in models.items():
        step = _pmapped(steps.make_train_step(model, tx, steps.LossConfig()), 1)
        new, metrics = step(
            _rep(state, 1), _split(_batch(16), 1), _rep(jax.random.PRNGKey(0), 1), None
        )
        out[name] = (jax.tree.map(lambda x: np.asarray(x)[0], new), float(metrics["loss"][0]))
    new16, loss16 = out["bf16"]
    for tree in (new16.params, new16.opt_state, new16.state["batch_stats"]):
        floats = [x for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)]
        assert floats and all(x.dtype == np.float32 for x in floats)
    assert np.isfinite(loss16)
    np.testing.assert_allclose(loss16, out["f32"][1], rtol=0.05)
    # the update moved the float32 master weights (not lost to bfloat16 rounding)
    moved = [
        np.max(np.abs(a - b))
        for a, b in zip(jax.tree.leaves(new16.params), jax.tree.leaves(state.params), strict=True)
    ]
    assert max(moved) > 1e-4


@pytest.mark.slow
def test_grad_norm_split_and_lr_metrics_leave_the_update_alone():
    """``grad_norm_trainable``/``grad_norm_frozen`` split the unmasked gradient by the mask
    (``trainable**2 + frozen**2`` = its squared norm, computed with an all-ones mask), the
    trainable part is what the optimizer sees (``grad_norm``), and ``lr`` is the schedule at the
    optimizer's count."""
    from qat_jax.train import schedules

    model = _model(quant=NO_TRANSFORM)
    sched = schedules.per_stage_schedule([1, 2], 0.05, 0, 0.1)
    tx = optax.sgd(sched)
    state, layers = _state(model, tx)
    ctrl = StageController([(q.path, q.block_id) for q in layers], ScheduleConfig("layer", 1), 0)
    stage_mask = ctrl.mask(1, state.params)  # freezes layer 0's kernel
    fn = _pmapped(steps.make_train_step(model, tx, steps.LossConfig(), sched), 1)
    batch, key = _split(_batch(8), 1), _rep(jax.random.PRNGKey(0), 1)

    _, m_all = fn(_rep(state, 1), batch, key, None)
    s_masked, m = fn(_rep(state.replace(mask=stage_mask), 1), batch, key, None)
    m_all = {k: float(np.asarray(v)[0]) for k, v in m_all.items()}
    m = {k: float(np.asarray(v)[0]) for k, v in m.items()}
    assert m_all["grad_norm_frozen"] == 0.0
    assert m_all["grad_norm_trainable"] == m_all["grad_norm"]
    full_sq = m_all["grad_norm"] ** 2
    assert m["grad_norm_frozen"] > 1e-3 * m_all["grad_norm"]  # the mask does freeze something
    assert m["grad_norm_trainable"] ** 2 + m["grad_norm_frozen"] ** 2 == pytest.approx(
        full_sq, rel=1e-5
    )
    assert m["grad_norm_trainable"] == m["grad_norm"]
    # The frozen part, from the raw gradient's leaves where the mask is 0 (SGD lr 1 deltas).
    raw = _grads(model, state, _batch(8), steps.LossConfig())
    frozen_sq = sum(
        float(np.sum(np.square(g)))
        for g, k in zip(jax.tree.leaves(raw), jax.tree.leaves(stage_mask), strict=True)
        if float(k) == 0.0
    )
    assert m["grad_norm_frozen"] ** 2 == pytest.approx(frozen_sq, rel=1e-3)
    # lr at count 0, then at count 1 (a restart of the per-stage schedule).
    assert m["lr"] == pytest.approx(float(sched(0)), rel=1e-7)
    _, m2 = fn(s_masked, _split(_batch(8, 1), 1), key, None)
    assert float(np.asarray(m2["lr"])[0]) == pytest.approx(float(sched(1)), rel=1e-7)
    assert float(sched(1)) == pytest.approx(0.05)
    # The diagnostics do not change the step: same params as a step built without a schedule.
    s_plain, _ = _pmapped(steps.make_train_step(model, tx, steps.LossConfig()), 1)(
        _rep(state.replace(mask=stage_mask), 1), batch, key, None
    )
    for a, b in zip(jax.tree.leaves(s_plain.params), jax.tree.leaves(s_masked.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_activation_stats_count_ones_dead_and_saturated_channels():
    from qat_jax.train import calibrate, parallel

    model = _model(quant=NO_TRANSFORM)
    state, layers = _state(model, optax.sgd(0.1))
    path = layers[1].path  # block 0's second layer: its input comes from a ReLU6
    tau = np.full_like(np.asarray(state.params["quant"][path[0]][path[1]]["tau"]), 0.3)
    tau[0], tau[1] = 1e3, -1e3  # channel 0 never +1 (dead), channel 1 always +1 (saturated)
    state = state.replace(params=set_path(state.params, ("quant", *path, "tau"), tau))
    n_dev = jax.local_device_count()
    images = [_batch(2 * n_dev, seed=s)["image"].reshape(n_dev, 2, 16, 16, 1) for s in (0, 1)]
    stats_fn = parallel.pmap(lambda v, x: steps.input_stats_step(model, v, x))
    out = calibrate.activation_stats(state, [path], stats_fn, images)

    # The same numbers from the layer's input captured directly.
    seen = []

    def capture(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == path:
            seen.append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    local = _model(quant=NO_TRANSFORM).clone(bn_axis_name=None)
    with nn.intercept_methods(capture):
        for x in images:
            local.apply(state.variables, x.reshape(-1, 16, 16, 1), train=False)
    x = np.concatenate([s.reshape(-1, s.shape[-1]) for s in seen])
    frac = np.mean(x - tau >= 0, axis=0)
    assert frac[0] == 0.0 and frac[1] == 1.0 and 0.0 < frac[2:].mean() < 1.0
    got = out[tuple(path)]
    assert got["ones"] == pytest.approx(float(frac.mean()), abs=1e-6)
    assert got["dead"] == int(np.sum(frac < 0.01)) >= 1
    assert got["saturated"] == int(np.sum(frac > 0.99)) >= 1


def test_bn_shift_on_hand_built_statistics():
    from qat_jax.train import calibrate

    before = {"a": {"bn": {"mean": np.array([0.0, 1.0]), "var": np.array([1.0, 4.0])}}}
    after = {"a": {"bn": {"mean": np.array([1.0, 1.0]), "var": np.array([np.e, 4.0])}}}
    shift = calibrate.bn_shift(before, after, eps=0.0)
    assert shift["dmean"] == pytest.approx(0.5)
    assert shift["dlogvar"] == pytest.approx(0.5)
    assert calibrate.bn_shift(before, before) == {"dmean": 0.0, "dlogvar": 0.0}
