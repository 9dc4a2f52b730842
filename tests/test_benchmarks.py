"""Keeps the benchmark scripts from rotting: a small piece of each, asserting what they rely on.

The benchmarks are not tests (no timings are asserted); what is asserted here is behaviour they
report: a stage switch of the progressive schedule changes only data, so the compiled train step
is reused (zero compiles), every method runs with the trainer's settings of that method, and every
function ``bench_run.py`` wraps still exists.
"""

import copy
import importlib.util
import os
import sys

import pytest

from qat_jax import experiment
from qat_jax.train.methods import METHODS, method_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"qat_jax_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_step():
    return _load("bench_step")


@pytest.mark.slow
def test_stage_switches_reuse_the_compiled_step(bench_step):
    setup = bench_step.load_setup("tiny")
    setup.config.model.inverted_residual_setting = ((1, 8, 1, 1),)  # one block + head: 2 stages
    log = bench_step.CompileLog()
    try:
        bench = bench_step.Bench(setup, methods=("bitat",))
        n = bench.controllers["bitat"].num_stages
        variants = [(f"stage {k}", "bitat", k) for k in range(n)] + [("final", "bitat", n)]
        med, first, raw = bench_step.time_steps(bench, variants, 1, 1, 1, log)
    finally:
        log.close()
    assert n == 2
    assert first["stage 0"]["compiles"] >= 1  # the step itself (the listener sees compiles)
    for label, _, _ in variants[1:]:
        assert first[label]["compiles"] == 0, (label, first[label])
    assert set(med) == {label for label, _, _ in variants}
    assert all(len(ts) == 1 and ts[0] > 0 for ts in raw.values())


def test_bench_run_wraps_existing_functions():
    bench_run = _load("bench_run")
    for owner, attr, _part in bench_run.targets():
        assert callable(getattr(owner, attr)), (owner, attr)


@pytest.mark.parametrize("setup_name", ["default", "mnv2_c100"])
def test_methods_are_set_up_as_the_trainer_does(bench_step, setup_name):
    """Per method: the trainer's quant config, schedule and model options (no compile)."""
    setup = bench_step.load_setup(setup_name)
    method_before = setup.config.method
    for method in METHODS:
        settings = method_settings(method)
        cfg = copy.deepcopy(setup.config)
        cfg.method = method
        ms = bench_step.method_setup(setup.config, method)
        assert ms.settings == settings, method
        assert ms.config.method == method
        assert ms.quant == experiment.quant_config(cfg), method
        sched = experiment.schedule_config(cfg)
        assert ms.schedule.granularity == sched.granularity, method
        assert ms.schedule.train_transform == sched.train_transform, method
        assert ms.schedule.final_train_latent == sched.final_train_latent, method
        bench_model = experiment.create_model(ms.config, setup.num_classes, ms.quant)
        model = experiment.create_model(cfg, setup.num_classes, ms.quant)
        for option in ("rprelu", "binary_shortcut"):
            assert getattr(bench_model, option, None) == getattr(model, option, None), (
                method,
                option,
            )
    assert setup.config.method == method_before  # the setup's config is not changed
    # The regression this guards: the benchmark's xnor used the config's ApproxSign gradient.
    assert bench_step.method_setup(setup.config, "xnor").quant.act_grad == "ste"


def test_profile_step_attributes_ops_to_kinds_and_layers():
    prof = _load("profile_step")
    hlo = "\n".join(
        [
            "  %pad_slice_fusion.17 = f32[8,4]{1,0} fusion(%x), kind=kLoop, metadata={op_name="
            '"jit(_fun)/jvp(MobileNetV2)/block2/depthwise/slice"}',
            "  %dot.3 = f32[16,96]{1,0} dot(%a, %b), metadata={op_name="
            '"jit(_fun)/transpose(jvp(MobileNetV2))/block2/expand/dot_general"}',
            "  %wrapped_broadcast.5 = f32[8,4]{1,0} fusion(%c), kind=kLoop",
            "  %ffi_call.2 = (f32[2,8,8,4]{3,2,1,0}, f32[3,3,4]{2,1,0}) custom-call(%x, %g, %k), "
            'custom_call_target="t", metadata={op_name='
            '"jit(_fun)/transpose(jvp(MobileNetV2))/block1/depthwise/ffi_call"}',
        ]
    )
    names = prof.hlo_op_names(hlo)
    assert names["pad_slice_fusion.17"].endswith("block2/depthwise/slice")
    assert names["ffi_call.2"].endswith("block1/depthwise/ffi_call")  # a tuple-shaped op
    events = [
        {"ph": "X", "name": "pad_slice_fusion.17", "dur": 4000},
        {"ph": "X", "name": "pad_slice_fusion.17", "dur": 2000},
        {"ph": "X", "name": "dot.3", "dur": 1000},
        {"ph": "X", "name": "wrapped_broadcast.5", "dur": 500},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 99000},  # runtime, not an op
        {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 99000},  # Python
        {"ph": "i", "name": "dot.3"},  # not a complete event
    ]
    agg = prof.aggregate(events, names, steps=2)
    assert agg["kinds"] == {
        ("fwd", "pad_slice_fusion"): 3.0,
        ("bwd", "dot"): 0.5,
        ("fwd", "wrapped_broadcast"): 0.25,
    }
    assert agg["layers"] == {
        ("fwd", "block2/depthwise"): 3.0,
        ("bwd", "block2/expand"): 0.5,
        ("fwd", "?"): 0.25,
    }
    assert agg["by_kind"] == {
        ("fwd", "depthwise conv"): 3.0,
        ("bwd", "1x1 conv"): 0.5,
        ("fwd", "other"): 0.25,
    }
    assert agg["total_ms"] == pytest.approx(3.75)


def test_profile_step_kinds_cover_every_layer_of_the_zoo_model():
    """Every parameterised layer of the default MobileNetV2 has a kind (none falls to 'other'),
    and the kinds are PyTorch's (``bench_vs_torch.TORCH_OP_KINDS``), so the tables compare."""
    import jax
    import jax.numpy as jnp

    from qat_jax import experiment

    prof, bench_step = _load("profile_step"), _load("bench_step")
    assert prof.LAYER_KINDS == _load("bench_vs_torch").TORCH_OP_KINDS
    setup = bench_step.load_setup("default", 8)
    ms = bench_step.method_setup(setup.config, "fp")
    model = experiment.create_model(ms.config, setup.num_classes, ms.quant)
    x = jnp.zeros((1, *setup.image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, train=False))
    kinds = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        keys = [p.key for p in path]
        scope = "/".join(keys[:2]) if keys[0].startswith("block") else keys[0]
        # the scope as op_layer reads it from an op's JAX name
        layer = prof.op_layer(f"jit(step)/jvp(MobileNetV2)/{scope}/mul")
        kinds[layer] = prof.layer_kind(layer)
    assert "other" not in kinds.values(), kinds
    assert kinds["block1/depthwise"] == "depthwise conv"
    assert kinds["block1/expand"] == kinds["head_conv"] == "1x1 conv"
    assert kinds["block1/expand_bn"] == "batch norm" and kinds["classifier"] == "dense"
    assert kinds["stem"] == "other conv"


@pytest.mark.slow
def test_profile_step_runs_on_the_tiny_setup(tmp_path):
    import json
    import subprocess

    out = tmp_path / "p.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "profile_step.py"),
        "--setup=tiny",
        "--mode=fp",
        "--steps=1",
        "--warmup=0",
        "--batch_size=16",
        f"--json={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["op_ms_per_step"] > 0 and r["median_step_ms"] > 0
    # every traced op lands in one kind row and one layer row
    assert sum(r["kinds"].values()) == pytest.approx(r["op_ms_per_step"])
    assert sum(r["layers"].values()) == pytest.approx(r["op_ms_per_step"])
    assert sum(r["layer_kinds"].values()) == pytest.approx(r["op_ms_per_step"])
    # the FP step has a backward pass, and ops of the model's layers are named
    assert any(k.startswith("bwd ") for k in r["kinds"])
    assert any(k.split(" ", 1)[1].startswith("block") for k in r["layers"])


@pytest.mark.slow
def test_bn_reestimation_reproduces_the_runs_accuracy(tmp_path):
    """With the run's own pool batches the diagnostic gives the run's final accuracy exactly."""
    from qat_jax.train import train_and_evaluate
    from qat_jax.train.config_files import load_config_file

    bn = _load("bn_reestimation")
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    config.unlock()
    config.progress = False
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert config.schedule.bn_batches == 1
    r = bn.bn_accuracies(config, str(tmp_path / "run"), ["2", "1"], window=1)
    assert r["saved"] == summary["final_accuracy"]
    # The pool's first batch, as in the run; with one batch both estimates are the same.
    assert r["first"][1] == {"pooled": summary["final_accuracy"], "per_batch": r["saved"]}
    assert r["windows"][(0, 1)] == r["first"][1]
    assert set(r["first"]) == {1, 2} and len(r["windows"]) == 4
    rows = [*r["first"].values(), *r["windows"].values()]
    assert all(0.0 <= a <= 1.0 for row in rows for a in row.values())
    with pytest.raises(ValueError, match="counts must be"):
        bn.bn_accuracies(config, str(tmp_path / "run"), ["0"], window=1)


def test_benchmarks_conv_impls_are_the_ops():
    """``--conv_impl``'s choices (kept jax-free in bench_step.py) are ``qat_jax.ops.IMPLS``."""
    from qat_jax import ops

    assert _load("bench_step").CONV_IMPLS == ops.IMPLS
    args = _load("profile_step").parse_args(["--conv_impl=cpu_ffi", "--model=vs_torch"])
    assert args.conv_impl == "cpu_ffi"
    with pytest.raises(SystemExit):
        _load("profile_step").parse_args(["--conv_impl=ffi"])
