"""Export: the .qat file (format, packing), the XNOR-popcount packed forward, the CLI, and the
fallback of the run reader (export and summary) from a corrupt latest checkpoint.

One tiny run (configs/tiny.py reduced to one stage, started from a torchvision-layout .safetensors file, so it also
checks ``config.init=<file>``) is exported; the packed forward must reproduce the training-time
eval logits on the real Fashion-MNIST eval split and give identical predictions.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from numerics import assert_logits_match

from qat_jax import experiment, export, interop, ops
from qat_jax import layers as qlayers
from qat_jax.models import MobileNetV2, init_variables, quantizable_layers
from qat_jax.models.resnet import ResNet
from qat_jax.train import checkpoint, train_and_evaluate
from qat_jax.train.config_files import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"

# Packed vs training-time eval logits: the binary dot products are exact integers in both paths
# (float32 sums of +-1 up to 2^24 are exact), so the only differences are float32 rounding of the
# folded BN affine (alpha * gamma / sigma in one product instead of three) and of the FP stem and
# classifier: observed ~1e-7 relative. 1e-5 relative to the largest logit leaves room for the
# rounding of other backends but would catch one flipped activation bit.
LOGIT_RTOL = 1e-5


# --- packed conv: exact integer arithmetic ----------------------------------------------------


@pytest.mark.parametrize(
    "kernel, strides, groups, cin, cout",
    [
        ((1, 1), (1, 1), 1, 40, 9),  # pointwise, 2 words per row
        ((1, 1), (2, 2), 1, 7, 5),  # strided pointwise (ResNet shortcut)
        ((3, 3), (1, 1), 1, 5, 7),  # regular 3x3, d = 45
        ((3, 3), (2, 2), 1, 3, 4),  # strided 3x3
        ((3, 3), (1, 1), 6, 6, 6),  # depthwise: one 9-bit word per channel
        ((3, 3), (2, 2), 8, 8, 8),  # strided depthwise
        ((3, 3), (1, 1), 2, 4, 6),  # grouped
    ],
)
def test_packed_conv_is_the_exact_binary_conv(kernel, strides, groups, cin, cout, rng):
    x = rng.normal(size=(2, 7, 6, cin)).astype(np.float32)
    x[0, 0, 0, 0] = 0.25
    tau = rng.normal(size=cin).astype(np.float32) * 0.3
    tau[0] = 0.25  # x == tau binarizes to +1 (sign(0) = +1)
    d = kernel[0] * kernel[1] * cin // groups
    b = rng.choice(np.array([-1, 1], np.int8), (groups, cout // groups, d))
    words = export.pack_rows(b.reshape(cout, d))
    assert words.dtype == np.uint32 and words.shape == (cout, -(-d // 32))
    np.testing.assert_array_equal(export.unpack_rows(words, d), b.reshape(cout, d))
    fn = jax.jit(export.binary_conv_packed, static_argnums=(3, 4, 5))
    got = fn(jnp.asarray(x), jnp.asarray(tau), jnp.asarray(words), kernel, strides, groups)
    assert got.dtype == jnp.int32
    # Reference: the float conv the layers run, on sign(x - tau) with zero padding.
    xb = np.where(x - tau >= 0, 1.0, -1.0).astype(np.float32)
    kern = qlayers.matrix_to_kernel(jnp.asarray(b, jnp.float32), (*kernel, cin // groups, cout))
    conv = jax.jit(ops.conv2d, static_argnums=(2, 3, 4, 5))
    want = conv(jnp.asarray(xb), kern, strides, None, groups, "xla")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.int32))


def test_bit_order_is_lsb_first_little_endian():
    row = -np.ones((1, 40), np.int8)
    row[0, [0, 3, 33]] = 1
    words = export.pack_rows(row)
    np.testing.assert_array_equal(words, [[0b1001, 0b10]])
    raw = np.packbits(np.pad(row[0] > 0, (0, 24)), bitorder="little").tobytes()
    assert words.astype("<u4").tobytes() == raw


# --- a small ResNet with random binary state: regular/strided 3x3, 1x1 shortcut, max pool ------


def _randomize_binary_state(model, variables, rng):
    v = jax.tree.map(np.array, variables)
    for q in quantizable_layers(v):
        b, quant, qs = (_node(v[coll], q.path) for coll in ("binary", "quant", "qstate"))
        b["B"] = rng.choice(np.array([-1, 1], np.int8), b["B"].shape)
        b["alpha"] = rng.uniform(0.01, 0.1, b["alpha"].shape).astype(np.float32)
        quant["tau"] = rng.normal(size=quant["tau"].shape).astype(np.float32) * 0.2
        qs["w_mode"] = np.asarray(qlayers.FROZEN, np.int32)
        qs["a_mode"] = np.asarray(1, np.int32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(v["batch_stats"])[0]:
        keys = [k.key for k in path]
        parent = _node(v["batch_stats"], keys[:-1])
        parent[keys[-1]] = (
            rng.uniform(0.5, 2.0, leaf.shape) if keys[-1] == "var" else rng.normal(size=leaf.shape)
        ).astype(np.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(v["params"])[0]:
        keys = [k.key for k in path]
        node = _node(v["params"], keys[:-1])
        if keys[-1] in ("scale", "bias"):
            node[keys[-1]] = (1 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
        elif keys[-1] == "slope":  # RPReLU
            node[keys[-1]] = rng.uniform(0.1, 0.4, leaf.shape).astype(np.float32)
        elif keys[-1] in ("shift_in", "shift_out"):
            node[keys[-1]] = (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    return v


def _node(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@pytest.mark.slow
def test_packed_resnet_matches_model_apply(tmp_path, rng):
    model = ResNet(
        stage_sizes=(1, 1),
        widths=(8, 16),
        stage_strides=(1, 2),
        stem="imagenet",
        num_classes=10,
        quant=qlayers.QuantConfig(transform=False),
        rprelu=True,  # ReActNet's RPReLU after the binary convs (the `rprelu` op)
    )
    variables = _randomize_binary_state(
        model, init_variables(model, jax.random.PRNGKey(0), (1, 16, 16, 3)), rng
    )
    path = os.path.join(tmp_path, "r.qat")
    export.export_model(path, model, variables, (16, 16, 3))
    packed = export.load_packed(path)
    kinds = [op["op"] for op in packed.header["ops"]]
    # conv1, conv2 and shortcut per block (the 64-channel stem makes block0 need one too).
    assert kinds.count("binary_conv") == 6 and "max_pool" in kinds
    assert kinds.count("rprelu") == 4  # act1 and act2 of both blocks
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    want = np.asarray(jax.jit(lambda v, z: model.apply(v, z, train=False))(variables, x))
    got = packed(x)
    assert_logits_match(got, want, LOGIT_RTOL)
    # The binary convs run on words: popcount is used, and no packed (uint32) value is ever
    # converted to a float -- only the int32 accumulators are, for the folded BN affine.
    jaxpr = jax.make_jaxpr(lambda t, z: export.packed_forward(packed.header["ops"], t, z))(
        {k: jnp.asarray(v) for k, v in packed.tensors.items()}, x
    ).jaxpr
    assert any(e.primitive.name == "population_count" for e in jaxpr.eqns)
    for e in jaxpr.eqns:
        ins = {str(v.aval.dtype) for v in e.invars if hasattr(v, "aval")}
        outs = {str(v.aval.dtype) for v in e.outvars}
        assert not ("uint32" in ins and outs & {"float32", "float16", "bfloat16"}), e


# --- a MobileNetV2 with a real-valued shortcut around every binary conv ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("modes, rprelu", [("binary", False), ("binary", True), ("fp", False)])
def test_packed_shortcut_mobilenetv2_matches_model_apply(tmp_path, rng, modes, rprelu):
    # stem 8; block0 t=1 (8 -> 8); block1 8 -> 48 -> 8 stride 2 (on 15x15: odd pool); block2 the
    # same at stride 1 (+ residual); block3 8 -> 24 -> 16 (unequal groups); head 16 -> 40.
    model = MobileNetV2(
        num_classes=10,
        width_mult=0.25,
        variant="cifar",
        dropout_rate=0.0,
        inverted_residual_setting=((1, 16, 1, 1), (6, 24, 2, 2), (3, 48, 1, 1)),
        last_channel=40,
        quant=qlayers.QuantConfig(transform=False),
        rprelu=rprelu,  # with RPReLU: the reactnet architecture
        binary_shortcut=True,
    )
    variables = _randomize_binary_state(
        model, init_variables(model, jax.random.PRNGKey(0), (1, 15, 15, 3)), rng
    )
    if modes == "fp":  # every conv FP (exported as `conv`), the shortcuts stay
        variables = jax.tree_util.tree_map_with_path(
            lambda p, a: np.zeros_like(a) if p[-1].key in ("w_mode", "a_mode") else a,
            variables,
        )
    path = os.path.join(tmp_path, "m.qat")
    export.export_model(path, model, variables, (15, 15, 3))
    packed = export.load_packed(path)
    ops_ = packed.header["ops"]
    convs = [op for op in ops_ if op["op"] in ("conv", "binary_conv") and op["name"] != "stem"]
    adds = [op for op in ops_ if op["op"] == "shortcut_add"]
    assert len(convs) == len(adds) == len(quantizable_layers(variables)) == 12
    assert all(op["op"] == ("binary_conv" if modes == "binary" else "conv") for op in convs)
    # Each shortcut_add follows its conv and adds that conv's input, matched to its output.
    for conv, add in zip(convs, adds, strict=True):
        assert add["in"] == [conv["out"], conv["in"]] and add["stride"] == conv["strides"]
        assert (add["c_in"], add["c_out"]) == (conv["c_in"], conv["c_out"])
    assert {op["match"] for op in adds} == {"identity", "repeat", "group_mean", "adaptive"}
    assert [op["stride"] for op in adds].count([2, 2]) == 1
    x = rng.normal(size=(4, 15, 15, 3)).astype(np.float32)
    want = np.asarray(jax.jit(lambda v, z: model.apply(v, z, train=False))(variables, x))
    got = packed(x)
    assert_logits_match(got, want, LOGIT_RTOL)
    # The same variables without the shortcut give another function (the op matters).
    plain = model.clone(binary_shortcut=False)
    other = np.asarray(jax.jit(lambda v, z: plain.apply(v, z, train=False))(variables, x))
    assert np.abs(other - want).max() > 1e-2 * np.abs(want).max()


# --- the tiny run -------------------------------------------------------------------------------


def _tiny_config(data_dir, init):
    c = load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    c.unlock()
    c.dataset.data_dir = str(data_dir)
    c.init = init
    # Cheapest complete QAT run (CI budget): one stage binarizing every layer, then the final
    # phase. 'progressive' (C = I) compiles ~2x faster than 'bitat'; the export reads only the
    # materialised B, alpha, tau and BN, which every method produces the same way.
    c.method = "progressive"
    c.schedule.granularity = "all"
    c.schedule.steps_per_stage = 2
    c.schedule.final_steps = 2
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_mnist_dir):
    root = tmp_path_factory.mktemp("export_run")
    data_dir = fashion_mnist_dir
    # The FP start: a torchvision-layout .safetensors file (config.init), written from a fresh
    # model, so no FP phase is trained here.
    init_path = os.path.join(root, "fp_init.safetensors")
    cfg = _tiny_config(data_dir, init_path)
    model = experiment.create_model(cfg, 10)
    fp = init_variables(model, jax.random.PRNGKey(42), (1, 32, 32, 1))
    interop.save_torchvision_safetensors(init_path, model, fp)
    workdir = os.path.join(root, "run")
    summary = train_and_evaluate(cfg, workdir)
    return workdir, summary, data_dir, fp


@pytest.mark.slow
@pytest.mark.xdist_group("export_tiny_run")
def test_run_started_from_safetensors_and_wrote_model_summary(tiny_run):
    workdir, summary, _, fp = tiny_run
    with ocp.StandardCheckpointer() as ck:
        teacher = ck.restore(os.path.join(workdir, "teacher"))
    for name in ("stem", "classifier"):
        np.testing.assert_array_equal(
            teacher["params"][name]["kernel"], fp["params"][name]["kernel"]
        )
    text = open(os.path.join(workdir, "model_summary.txt")).read()
    assert "block1/depthwise" in text and "compression" in text and "1-bit" in text
    assert summary["w1a1_accuracy"] is not None


@pytest.mark.slow
@pytest.mark.xdist_group("export_tiny_run")
def test_export_cli_writes_packed_file_without_latent_weights(tiny_run, tmp_path):
    workdir, _, _, _ = tiny_run
    out = os.path.join(tmp_path, "model.qat")
    res = subprocess.run(
        [sys.executable, "-m", "qat_jax.export", f"--workdir={workdir}", f"--out={out}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert res.returncode == 0, res.stderr
    assert "bytes" in res.stdout
    header, tensors = export.read_container(out)
    run = export.load_run_variables(workdir)
    binary_ops = [op for op in header["ops"] if op["op"] == "binary_conv"]
    assert [op["name"] for op in binary_ops] == [
        "/".join(q.path) for q in quantizable_layers(run.variables)
    ]
    for op in binary_ops:
        path = tuple(op["name"].split("/"))
        b = np.asarray(_node(run.variables["binary"], path)["B"])
        assert tensors[op["weights"]].dtype == np.uint32
        assert tensors[op["weights"]].shape == (op["c_out"], -(-op["d"] // 32))
        np.testing.assert_array_equal(
            export.unpack_rows(tensors[op["weights"]], op["d"]), b.reshape(op["c_out"], -1)
        )
        np.testing.assert_array_equal(
            tensors[op["alpha"]],
            np.asarray(_node(run.variables["binary"], path)["alpha"]).reshape(-1),
        )
        np.testing.assert_array_equal(
            tensors[op["tau"]], np.asarray(_node(run.variables["quant"], path)["tau"])
        )
        assert f"{op['name']}/kernel" not in tensors  # no latent weights
    assert not any(k.endswith(("/P", "/rho", "/V0")) for k in tensors)  # no transform
    # Every float tensor is a per-channel vector except the FP stem and classifier.
    big_float = {
        k.split("/")[0] for k, v in tensors.items() if v.dtype == np.float32 and v.ndim > 1
    }
    assert big_float == {"stem", "classifier"}


def _read_by_the_doc(path):
    """A reader written from docs/deployment.md only (struct + json + numpy)."""
    blob = open(path, "rb").read()
    assert blob[:8] == b"QATJAXBN"
    version, hlen = struct.unpack("<IQ", blob[8:20])
    header = json.loads(blob[20 : 20 + hlen])
    start = -(-(20 + hlen) // 64) * 64
    dt = {"float32": "<f4", "uint32": "<u4", "int32": "<i4"}
    tensors = {
        name: np.frombuffer(
            blob, dt[t["dtype"]], int(np.prod(t["shape"])), start + t["offset"]
        ).reshape(t["shape"])
        for name, t in header["tensors"].items()
    }
    return version, header, tensors


@pytest.mark.slow
@pytest.mark.xdist_group("export_tiny_run")
def test_packed_forward_reproduces_eval_logits_on_the_test_split(tiny_run, tmp_path):
    workdir, summary, data_dir, _ = tiny_run
    path = os.path.join(tmp_path, "tiny.qat")
    size = export.export_run(workdir, path)
    assert size == os.path.getsize(path)
    version, header, raw = _read_by_the_doc(path)
    _, tensors = export.read_container(path)
    assert version == 1 and raw.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(raw[k], tensors[k])

    run = export.load_run_variables(workdir)
    packed = export.load_packed(path)
    got, want, labels = export.packed_and_eval_logits(run, packed, batch_size=100)
    assert len(labels) == 200  # the whole (tiny) eval split
    assert_logits_match(got, want, LOGIT_RTOL)
    # ... and the packed model's accuracy is the run's final W1A1 test accuracy.
    assert np.mean(got.argmax(-1) == labels) == pytest.approx(summary["w1a1_accuracy"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.xdist_group("export_tiny_run")
def test_verify_of_an_earlier_step_compares_that_steps_model(tiny_run, tmp_path):
    # ``python -m qat_jax.export --step=N --verify``: the eval side is checkpoint N (the step in
    # the file's header), not the run's latest, whose final phase changed the model.
    workdir = tiny_run[0]
    steps = checkpoint.checkpoint_steps(os.path.join(workdir, "checkpoints"))
    assert len(steps) >= 2, steps
    path = str(tmp_path / "earlier.qat")
    export.export_run(workdir, path, step=steps[-2])
    packed = export.load_packed(path)
    assert packed.header["extra"]["step"] == steps[-2]
    r = export.verify_packed(workdir, path, batch_size=100)
    assert r["examples"] == 200
    assert r["max_rel_diff"] <= LOGIT_RTOL, r
    assert r["prediction_mismatches"] == 0 and r["packed_accuracy"] == r["eval_accuracy"]
    # The latest model's logits are not that step's, so the comparison above could fail.
    got, want, _ = export.packed_and_eval_logits(
        export.load_run_variables(workdir), packed, batch_size=100
    )
    assert np.abs(got - want).max() > 100 * LOGIT_RTOL * np.abs(want).max()


# --- a corrupt latest checkpoint: the reader falls back, and says to which step ----------------


def _copy_with_corrupt_latest(workdir, dst) -> list[int]:
    """A copy of the run whose latest checkpoint has every file truncated to half its size (its
    JSON records end mid-string, its arrays are short); returns the copy's checkpoint steps."""
    shutil.copytree(workdir, dst)
    steps = checkpoint.checkpoint_steps(os.path.join(dst, "checkpoints"))
    assert len(steps) >= 2, steps
    for root, _, files in os.walk(os.path.join(dst, "checkpoints", str(steps[-1]))):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    return steps


@pytest.mark.slow
@pytest.mark.xdist_group("export_tiny_run")
def test_run_reader_falls_back_to_the_newest_readable_checkpoint(tiny_run, tmp_path, caplog):
    workdir, _, _, _ = tiny_run
    copy = str(tmp_path / "run")
    steps = _copy_with_corrupt_latest(workdir, copy)
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        run = export.load_run_variables(copy)
    assert run.step == steps[-2]
    assert [s for s, _ in run.unreadable] == [steps[-1]]
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"checkpoint {steps[-1]} in " in message and "unreadable" in message
    assert message.endswith(f"; using step {steps[-2]}")
    want = export.load_run_variables(workdir, steps[-2])
    for a, b in zip(jax.tree.leaves(run.variables), jax.tree.leaves(want.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointReadError, match=f"checkpoint {steps[-1]} in "):
        export.load_run_variables(copy, steps[-1])  # an explicit step does not fall back
    with pytest.raises(FileNotFoundError, match="no checkpoint 12345"):
        export.load_run_variables(copy, 12345)


@pytest.mark.slow
@pytest.mark.xdist_group("export_tiny_run")
@pytest.mark.parametrize("cli", ["export", "summary"])
def test_export_and_summary_clis_fall_back_and_name_the_step(tiny_run, tmp_path, cli):
    workdir, _, _, _ = tiny_run
    copy = str(tmp_path / "run")
    steps = _copy_with_corrupt_latest(workdir, copy)
    out = os.path.join(tmp_path, "model.qat")
    args = [f"--workdir={copy}"] + ([f"--out={out}"] if cli == "export" else [])
    res = subprocess.run(
        [sys.executable, "-m", f"qat_jax.{cli}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"warning: checkpoint {steps[-1]} in "), lines[0]
    assert "unreadable" in lines[0] and lines[0].endswith(f"; using step {steps[-2]}")
    if cli == "export":
        header, _ = export.read_container(out)
        assert header["extra"]["step"] == steps[-2]
    else:
        assert f"step {steps[-2]})" in res.stdout
