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
from qat_jax.tree import get_path, leaves_with_paths

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
