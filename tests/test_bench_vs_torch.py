"""``benchmarks/bench_vs_torch.py``: its PyTorch twin is the JAX model (no timings asserted).

* without torch the command prints one line and exits 0;
* the PyTorch MobileNetV2 takes every JAX variable at the same shape and has the same trainable
  parameter count, for both modes, at the default job's size and at the issue's 700,202 (shapes
  only, nothing compiled);
* at the tiny size, PyTorch's train-mode logits and cross-entropy gradients equal JAX's for ``fp``
  and ``xnor`` (binary weights and inputs, the STE of both), and each PyTorch train step runs.
"""

import copy
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from numerics import assert_close_to_scale, assert_logits_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_vs_torch.py")


@pytest.fixture(scope="module")
def bvt():
    spec = importlib.util.spec_from_file_location("qat_jax_bench_bench_vs_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_skips_cleanly_without_torch(tmp_path):
    (tmp_path / "torch.py").write_text("raise ImportError('no torch here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    out = subprocess.run(
        [sys.executable, SCRIPT, "--setup=tiny"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "torch not installed: skipping\n"


def _shape_only_variables(bvt, setup, mode):
    """``(meta, arrays)`` of ``mode``'s model from ``jax.eval_shape`` (zeros; no compile)."""
    import jax
    import jax.numpy as jnp

    from qat_jax import experiment

    ms = bvt.bench_step.method_setup(setup.config, mode)
    model = experiment.create_model(ms.config, setup.num_classes, ms.quant)
    x = jnp.zeros((1, *setup.image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, train=False))
    arrays = {}
    for collection in ("params", "quant", "batch_stats"):
        for k, v in bvt._flatten(
            jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes[collection])
        ).items():
            arrays[f"{mode}/vars/{collection}/{k}"] = v
    return bvt.mode_meta(setup, mode, model), arrays


@pytest.mark.parametrize("setup_name, fp_params", [("default", 45_898), ("issue", 700_202)])
def test_torch_twin_has_the_jax_architecture(bvt, setup_name, fp_params):
    pytest.importorskip("torch")
    setup = bvt.make_setup(setup_name, 8)
    for mode in bvt.MODES:
        meta, arrays = _shape_only_variables(bvt, setup, mode)
        model = bvt.build_torch_model(meta, arrays, mode)  # asserts every shape
        tau = sum(v.size for k, v in arrays.items() if k.endswith("/tau"))
        expected = fp_params + (tau if mode == "xnor" else 0)
        assert bvt.trainable_count(model) == expected, mode
    assert meta["act_grad"] == "ste" and meta["binary"] and not meta["transform"]


@pytest.mark.slow
def test_torch_twin_matches_jax_logits_and_gradients(bvt):
    torch = pytest.importorskip("torch")
    bench_step = bvt.bench_step
    setup = bvt.make_setup("tiny", 8)
    bench = bench_step.Bench(setup, methods=bvt.MODES)
    bvt.set_thresholds(bench, "xnor")
    images = bench.host_images.reshape(-1, *setup.image_shape)
    labels = np.arange(images.shape[0]) % setup.num_classes
    meta, arrays = bvt.export_reference(bench, bvt.MODES, images, labels, "grads")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    for mode in bvt.MODES:
        mm = meta["modes"][mode]
        model = bvt.build_torch_model(mm, arrays, mode)
        assert bvt.trainable_count(model) == mm["jax_trainable_params"], mode
        # The twin's forward and CE gradients (tests/numerics.py's scale-relative bounds).
        twin = copy.deepcopy(model).train()
        logits = twin(x)
        assert_logits_match(
            logits.detach().numpy(), arrays[f"{mode}/logits"], bvt.PARITY_TOL, err_msg=mode
        )
        torch.nn.functional.cross_entropy(logits, y).backward()
        got = bvt._from_torch_grads(twin)
        prefix = f"{mode}/grads/"
        ref = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        floor = bvt.GRAD_FLOOR * max(float(np.max(np.abs(v))) for v in ref.values())
        for key, g in ref.items():
            if key not in got:
                assert mode == "fp" and key.endswith("/tau") and not np.any(g), key
                continue
            assert_close_to_scale(
                got[key], g, bvt.GRAD_TOL, scale=max(float(np.max(np.abs(g))), floor), err_msg=key
            )
        if mode == "xnor":  # every binary layer's threshold gets a gradient
            assert all(np.any(got[k]) for k in got if k.endswith("/tau"))
        # The benchmark's own check and one train step of each mode (KD teacher for xnor).
        par = bvt.torch_parity(model, arrays, mode)
        assert par["logits"] <= bvt.PARITY_TOL and par["grads"] <= bvt.GRAD_TOL, par
        teacher = None
        if mm["kd_weight"]:
            teacher = bvt.build_torch_model({**mm, "binary": False}, arrays, mode).eval()
        opt = torch.optim.Adam(model.parameters(), lr=mm["learning_rate"])
        before = model.head_conv.weight.detach().clone()
        loss = bvt.torch_train_step(model, teacher, opt, mm)(x, y)
        assert np.isfinite(loss), mode
        assert not torch.equal(before, model.head_conv.weight), mode
    assert meta["modes"]["xnor"]["kd_weight"] > 0 and meta["modes"]["fp"]["kd_weight"] == 0


def test_torch_op_kinds_tell_convs_apart_by_their_weight(bvt):
    kind = bvt.torch_op_kind
    x, dw, pw = [128, 48, 32, 32], [48, 1, 3, 3], [96, 48, 1, 1]
    assert kind("aten::mkldnn_convolution", [x, dw, [48], [], [], [], []]) == "depthwise conv"
    assert kind("aten::convolution_backward", [x, x, dw, [], [], []]) == "depthwise conv"
    assert kind("aten::mkldnn_convolution", [x, pw, [], [], [], [], []]) == "1x1 conv"
    assert kind("aten::convolution_backward", [x, x, pw, [], [], []]) == "1x1 conv"
    # the stem, a 3x3 conv of the one-channel image, has I/groups == 1 too but is not depthwise
    gray, stem = [128, 1, 32, 32], [16, 1, 3, 3]
    assert kind("aten::mkldnn_convolution", [gray, stem, [], [], [], [], []]) == "other conv"
    assert kind("aten::convolution_backward", [[128, 16, 32, 32], gray, stem]) == "other conv"
    assert kind("aten::mkldnn_convolution", [x, []]) == "other conv"
    assert kind("aten::native_batch_norm_backward", [x]) == "batch norm"
    assert kind("aten::hardtanh_backward", [x]) == kind("aten::clamp", [x]) == "activation"
    assert kind("aten::addmm", [[10], [128, 256], [256, 10]]) == "dense"
    assert kind("aten::copy_", [x, x]) == "copies"
    assert kind("Optimizer.step#Adam.step", []) == "other"


@pytest.mark.slow
def test_torch_profile_sums_the_steps_ops_by_kind(bvt):
    """One profiled PyTorch step of the tiny twin: every kind of its layers appears, and the
    kinds add up to the profile's total."""
    torch = pytest.importorskip("torch")
    setup = bvt.make_setup("tiny", 8)
    bench = bvt.bench_step.Bench(setup, methods=("fp",))
    images = bench.host_images.reshape(-1, *setup.image_shape)
    labels = np.arange(images.shape[0]) % setup.num_classes
    meta, arrays = bvt.export_reference(bench, ("fp",), images, labels, "logits")
    mm = meta["modes"]["fp"]
    model = bvt.build_torch_model(mm, arrays, "fp").train()
    opt = torch.optim.Adam(model.parameters(), lr=mm["learning_rate"])
    step = bvt.torch_train_step(model, None, opt, mm)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    prof = bvt.torch_profile(step, x, y, steps=2)
    assert sum(prof["kinds"].values()) == pytest.approx(prof["total_ms"], rel=1e-3)
    for k in ("depthwise conv", "1x1 conv", "batch norm", "activation", "dense"):
        assert prof["kinds"].get(k, 0) > 0, (k, prof["kinds"])
