"""The stage boundaries on the tiny model: what each one does to the host train state."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from qat_jax import experiment
from qat_jax import layers as qlayers
from qat_jax import models as qmodels
from qat_jax.train import calibrate, parallel, reporting
from qat_jax.train.boundaries import Boundaries, quant_layer_metrics
from qat_jax.train.config_files import load_config_file
from qat_jax.tree import get_path, leaves_with_paths, set_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 1)

pytestmark = pytest.mark.slow  # compiles the tiny model's calibration and BN passes


@pytest.fixture(scope="module")
def tiny():
    """The tiny config's model, initial state and a run's boundaries (no test-set evaluation
    between stages: ``stage_eval_examples = 0``)."""
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    config.stage_eval_examples = 0
    config.log_layer_metrics = True
    qcfg = experiment.quant_config(config)
    model = experiment.create_model(config, 10, qcfg, bn_axis_name=parallel.AXIS)
    variables = qmodels.init_variables(model, jax.random.PRNGKey(0), (1, *SHAPE))
    layers = experiment.binary_layers(config, qmodels.quantizable_layers(variables))
    tx = experiment.create_optimizer(config.optim, lambda count: 1e-3)
    hstate = experiment.create_train_state(variables, tx)
    r = np.random.default_rng(0)
    pool = [r.normal(size=(jax.local_device_count(), 2, *SHAPE)).astype(np.float32)]
    controller = experiment.create_controller(config, layers)
    boundaries = Boundaries.create(config, model, controller, qcfg, None, pool)
    return config, layers, hstate, boundaries


def _fresh(tiny, workdir):
    """The fixture's boundaries (their compiled passes) with a new controller and reporter."""
    config, layers, hstate, b = tiny
    controller = experiment.create_controller(config, layers)
    reporter = reporting.Reporter(str(workdir), progress=False)
    return dataclasses.replace(b, controller=controller, reporter=reporter), hstate


def _records(workdir, kind):
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_the_declared_bn_momentum_is_the_measured_one(tiny):
    _, _, hstate, b = tiny
    rvars = parallel.replicate(hstate.variables)
    assert b.bn_momentum == calibrate.measure_bn_momentum(b.bn_fn, rvars, b.calib_pool[0])


def _bn_input_moments(model, variables, images):
    """Per BN layer, the mean and (biased) variance of its input in an eval-mode forward."""
    import flax.linen as nn
    import jax.numpy as jnp

    from qat_jax.models.batchnorm import BatchNorm

    def record(next_fun, args, kwargs, context):
        if (
            isinstance(context.module, BatchNorm | nn.BatchNorm)
            and context.method_name == "__call__"
        ):
            x = args[0]
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            for name, v in (("mean", mean), ("var", var)):
                context.module.sow("moments", name, v, init_fn=lambda: 0, reduce_fn=lambda _, b: b)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _, out = model.apply(variables, images, train=False, mutable=["moments"])
    return out["moments"]


def _binary_inputs(tiny):
    """The fixture's state with every binary layer's input binarized (weights FP), and a pool
    of 3 batches of 8 images unlike each other (so that per-batch statistics differ)."""
    _, layers, hstate, b = tiny
    modes = {q.path: (qlayers.FP, qlayers.BINARY_INPUT) for q in layers}
    hs = calibrate.apply_modes(hstate, modes)
    # Thresholds inside the ReLU6 range (at 0 every input would binarize to +1, a constant that
    # leaves only float noise after the next BN).
    params = dict(hs.params)
    for q in layers:
        params = set_path(
            params,
            ("quant", *q.path, "tau"),
            np.full_like(get_path(params, ("quant", *q.path, "tau")), 0.5),
        )
    hs = hs.replace(params=params)
    r = np.random.default_rng(1)
    pool = [
        (r.normal(size=(jax.local_device_count(), 8, *SHAPE)) * (1 + i) + i).astype(np.float32)
        for i in range(3)
    ]
    config = tiny[0]
    model = experiment.create_model(config, 10, experiment.quant_config(config))
    return hs, b, pool, model


def test_pooled_bn_statistics_are_those_of_the_network_as_evaluated(tiny):
    """The pooled estimate is the fixed point of eval-mode re-estimation: evaluated with it,
    every BN layer's input has exactly the mean and variance it normalises with."""
    hs, b, pool, model = _binary_inputs(tiny)
    images = np.concatenate(pool, axis=1).reshape(-1, *SHAPE)
    est = calibrate.reestimate_bn(hs, b.bn_fn, pool, b.bn_momentum, pooled=True)
    stats = est.state["batch_stats"]
    moments = _bn_input_moments(model, est.variables, images)
    layers = [p[:-1] for p, _ in leaves_with_paths(stats) if p[-1] == "mean"]
    assert layers
    for p in layers:
        mean, var = (np.asarray(get_path(stats, (*p, k))) for k in ("mean", "var"))
        # float32 rounding of E[x^2] - E[x]^2 (Flax's variance) is relative to E[x^2].
        second = float(np.max(np.square(mean) + var))
        np.testing.assert_allclose(
            get_path(moments, (*p, "mean")),
            mean,
            rtol=1e-4,
            atol=1e-5 * np.sqrt(second),
            err_msg=str(p),
        )
        np.testing.assert_allclose(
            get_path(moments, (*p, "var")), var, rtol=1e-4, atol=1e-5 * second
        )
    # The mean of per-batch statistics is not a fixed point of this network.
    per = calibrate.reestimate_bn(hs, b.bn_fn, pool, b.bn_momentum, pooled=False)
    per_stats = per.state["batch_stats"]
    moments = _bn_input_moments(model, per.variables, images)
    gaps = [
        float(np.max(np.abs(np.asarray(get_path(moments, p)) - v)) / np.max(np.abs(v)))
        for p, v in leaves_with_paths(per_stats)
    ]
    assert max(gaps) > 1e-2, gaps


def test_per_batch_bn_statistics_are_the_mean_of_single_batch_estimates(tiny):
    hs, b, pool, _ = _binary_inputs(tiny)
    single = [
        calibrate.reestimate_bn(hs, b.bn_fn, [x], b.bn_momentum).state["batch_stats"] for x in pool
    ]
    per = calibrate.reestimate_bn(hs, b.bn_fn, pool, b.bn_momentum, pooled=False)
    want = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *single)
    for (path, got), (_, w) in zip(
        leaves_with_paths(per.state["batch_stats"]), leaves_with_paths(want), strict=True
    ):
        np.testing.assert_allclose(
            got, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()), err_msg=str(path)
        )


def test_entering_stages_calibrates_switches_modes_masks_and_materialises(tiny, tmp_path):
    b, hstate = _fresh(tiny, tmp_path)
    c = b.controller
    stage_acc: list = []
    s0 = b.enter_stage(b.reestimate(hstate), 0, stage_acc, 0.0)
    assert c.entered == 0 and stage_acc == []  # nothing to evaluate after the FP phase
    for p, (w, a) in c.modes(0).items():
        assert int(get_path(s0.state, ("qstate", *p, "w_mode"))) == w
        assert int(get_path(s0.state, ("qstate", *p, "a_mode"))) == a
    want = c.mask(0, s0.params)
    for path, m in leaves_with_paths(s0.mask):
        assert float(m) == float(get_path(want, path)), path
    # Calibrated: the stage's thresholds set (from 0), the others still 0; P reset, V0 orthonormal.
    for p in c.layers:
        tau = get_path(s0.params, ("quant", *p, "tau"))
        assert np.any(tau != 0) == (p in c.stages[0].layers), p
    for p in c.stages[0].layers:
        v0 = get_path(s0.state, ("calib", *p, "V0"))
        gram = np.swapaxes(v0, -1, -2) @ v0  # per group of a grouped conv
        np.testing.assert_allclose(
            gram, np.broadcast_to(np.eye(v0.shape[-1]), gram.shape), atol=1e-5
        )
        assert not np.any(get_path(s0.params, ("quant", *p, "P")))
    (record,) = _records(tmp_path, "transition")
    assert record["stage"] == 0 and "bn_switch_dmean" in record and "dead_channels" in record

    # Into stage 1: stage 0's completed blocks are materialised (B = the layer's binary weights)
    # and frozen; the layer metrics see no flip of B between two identical states.
    s1 = b.enter_stage(s0, 1, stage_acc, 0.0)
    assert c.entered == 1 and c.stages[0].completes
    for p in c.stages[0].completes:
        assert int(get_path(s1.state, ("qstate", *p, "w_mode"))) == qlayers.FROZEN
        bits = get_path(s1.state, ("binary", *p, "B"))
        assert set(np.unique(bits)) <= {-1, 1}
        want_b, _, _ = calibrate.binary_weights_and_error(
            get_path(s1.params, ("params", *p, "kernel")),
            bits.shape[0],
            get_path(s1.params, ("quant", *p)),
            get_path(s1.state, ("calib", *p), {}),
            b.qcfg,
            int(b.config.quant.refine_sweeps),
        )
        np.testing.assert_array_equal(bits, np.asarray(want_b))
    prev_b: dict = {}
    first = quant_layer_metrics(s1, c.stage_layers(1), b.qcfg, prev_b)
    again = quant_layer_metrics(s1, c.stage_layers(1), b.qcfg, prev_b)
    names = ["/".join(p) for p in c.stages[1].layers]
    assert sorted(first) == sorted(f"binerr/{n}" for n in names)
    assert all(again[f"flip/{n}"] == 0.0 for n in names)
    assert all(again[f"binerr/{n}"] == first[f"binerr/{n}"] >= 0.0 for n in names)


def test_finish_after_a_latent_final_phase_freezes_every_layer_with_the_same_outputs(
    tiny, tmp_path
):
    """``final_train_latent``: the final phase trains every layer binarizing; ``finish``
    materialises them and leaves them frozen binary, computing what the binarizing modes did."""
    _, layers, hstate, b = tiny
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    config.unlock()
    config.schedule.final_train_latent = True
    controller = experiment.create_controller(config, layers)
    reporter = reporting.Reporter(str(tmp_path), progress=False)
    b = dataclasses.replace(b, controller=controller, reporter=reporter, config=config)
    b.evaluate = lambda hs, stage=False: {"accuracy": 0.5}  # no test set here
    hs = b.reestimate(hstate)
    for k in range(controller.final_index + 1):
        hs = b.enter_stage(hs, k, [], 0.0)
    final_state, _ = b.finish(hs, [])
    for q in layers:
        assert int(get_path(final_state.state, ("qstate", *q.path, "w_mode"))) == qlayers.FROZEN
        assert (
            int(get_path(final_state.state, ("qstate", *q.path, "a_mode"))) == qlayers.BINARY_INPUT
        )
    model = experiment.create_model(config, 10, experiment.quant_config(config))
    images = b.calib_pool[0].reshape(-1, *SHAPE)
    frozen = model.apply(final_state.variables, images, train=False)
    binarizing = calibrate.apply_modes(
        final_state, {q.path: (qlayers.BINARIZING, qlayers.BINARY_INPUT) for q in layers}
    )
    want = model.apply(binarizing.variables, images, train=False)
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(frozen, want, rtol=1e-5, atol=1e-5 * scale)


def test_finish_enters_the_final_phase_when_no_step_did_and_evaluates(tiny, tmp_path):
    b, hstate = _fresh(tiny, tmp_path)
    c = b.controller
    accuracies = iter([0.25, 0.5])
    b.evaluate = lambda hs, stage=False: {"accuracy": next(accuracies)}  # no test set here
    hs = b.reestimate(hstate)
    for k in range(c.num_stages):
        hs = b.enter_stage(hs, k, [], 0.0)
    stage_acc: list = []
    final_state, final = b.finish(hs, stage_acc)
    assert c.entered == c.final_index and final == 0.25
    assert stage_acc == [{"label": "final", "accuracy": 0.25}]
    for p in c.layers:  # every layer frozen binary
        assert int(get_path(final_state.state, ("qstate", *p, "w_mode"))) == qlayers.FROZEN
