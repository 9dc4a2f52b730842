"""The Larq-style model summary against hand-computed numbers, and torchvision's totals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from qat_jax import layers as qlayers
from qat_jax import summary
from qat_jax.models import MobileNetV2, ResNet18, init_variables
from qat_jax.summary import __main__ as summary_cli

# A model small enough to count by hand: stem 3x3 1->8, one t=1 block (depthwise 3x3 on 8
# channels, project 1x1 8->8, residual), head 1x1 8->16, classifier 16->10, on 8x8x1 inputs.
TINY = dict(
    num_classes=10,
    width_mult=0.25,
    variant="cifar",
    inverted_residual_setting=((1, 8, 1, 1),),
    last_channel=16,
    quant=qlayers.QuantConfig(transform=False),
)


@pytest.fixture(scope="module")
def tiny():
    model = MobileNetV2(**TINY)
    return model, init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 1))


def test_tiny_model_by_hand(tiny):
    model, variables = tiny
    s = summary.model_summary(model, variables, (8, 8, 1), binary="all")
    rows = {r.name: r for r in s.rows}
    assert list(rows) == [
        "stem",
        "stem_bn",
        "block0/depthwise",
        "block0/depthwise_bn",
        "block0/project",
        "block0/project_bn",
        "head_conv",
        "head_bn",
        "classifier",
    ]
    # params: kernels 3*3*1*8, 3*3*1*8, 8*8, 8*16; dense 16*10 + 10; BN 2*C.
    expect_params = [72, 16, 72, 16, 64, 16, 128, 32, 170]
    assert [r.params for r in s.rows] == expect_params
    assert [r.binary for r in s.rows] == [
        False,
        False,
        True,
        False,
        True,
        False,
        True,
        False,
        False,
    ]
    # MACs on 8x8 (stride 1 everywhere): 64 positions * C_out * kh*kw*C_in/groups.
    assert rows["stem"].fp_macs == 64 * 8 * 9 == 4608
    assert rows["block0/depthwise"].binary_macs == 64 * 8 * 9 == 4608
    assert rows["block0/project"].binary_macs == 64 * 8 * 8 == 4096
    assert rows["head_conv"].binary_macs == 64 * 16 * 8 == 8192
    assert rows["classifier"].fp_macs == 160
    # Memory: binary layers 1 bit per weight + float32 alpha (C_out) and tau (C_in).
    assert rows["block0/depthwise"].memory_bits == 72 + 32 * (8 + 8)
    assert rows["head_conv"].memory_bits == 128 + 32 * (16 + 8)
    t = s.totals()
    assert t["params"] == 586 and t["binary_params"] == 264 and t["fp_params"] == 322
    assert t["fp32_bytes"] == 586 * 4 == 2344
    # 322 FP params * 32 + 264 binary bits + 32 * (alpha 8+8+16 + tau 8+8+8) = 12360 bits.
    assert t["packed_bytes"] == 12360 / 8 == 1545
    assert t["compression"] == pytest.approx(2344 / 1545)
    assert t["binary_macs"] == 16896 and t["fp_macs"] == 4768
    assert t["ops"] == 16896 / 64 + 4768 == 5032
    text = summary.format_summary(s)
    assert "compression 1.52x" in text and "OPs = BOPs/64 + FLOPs = 5,032" in text


def test_modes_decide_what_is_binary(tiny):
    model, variables = tiny
    fp = summary.model_summary(model, variables, (8, 8, 1), binary="modes")
    assert fp.binary_params == 0 and fp.bops == 0 and fp.compression == 1.0
    v = jax.tree.map(np.array, variables)
    v["qstate"]["head_conv"]["w_mode"] = np.asarray(qlayers.FROZEN, np.int32)  # W1, input FP
    v["qstate"]["block0"]["project"]["w_mode"] = np.asarray(qlayers.FROZEN, np.int32)
    v["qstate"]["block0"]["project"]["a_mode"] = np.asarray(1, np.int32)  # W1A1
    s = summary.model_summary(model, v, (8, 8, 1))
    rows = {r.name: r for r in s.rows}
    assert rows["head_conv"].binary and rows["head_conv"].binary_macs == 0
    assert rows["head_conv"].fp_macs == 8192
    assert rows["block0/project"].binary_macs == 4096
    assert not rows["block0/depthwise"].binary and s.binary_params == 128 + 64


@pytest.mark.parametrize(
    "model, params, gmacs",
    [(MobileNetV2(num_classes=1000), 3_504_872, 0.30), (ResNet18(), 11_689_512, 1.81)],
)
def test_torchvision_sized_models(model, params, gmacs):
    """torchvision's documented counts: params, and MACs ("GFLOPS") 0.30 / 1.81 at 224x224."""
    shapes = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 224, 224, 3)), train=False), jax.random.PRNGKey(0)
    )
    s = summary.model_summary(model, shapes, (224, 224, 3), binary="all")
    assert s.params == params
    assert round((s.bops + s.flops) / 1e9, 2) == gmacs
    assert s.compression > 2.0  # every conv but the stem is binary


def test_cli_on_a_config(capsys, tmp_path):
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(tmp_path, "s.json")
    args = ["--config", os.path.join(root, "configs/tiny.py"), "--num_classes=10", f"--json={out}"]
    flags.FLAGS.unparse_flags()
    assert summary_cli.main(summary_cli.parse_flags(["qat_jax.summary", *args])) == 0
    text = capsys.readouterr().out
    assert "binary=all" in text and "head_conv" in text
    d = json.load(open(out))
    assert d["totals"]["params"] == sum(r["params"] for r in d["layers"])


def test_cli_on_a_config_counts_only_what_the_config_binarizes(capsys, tmp_path):
    """configs/default.py keeps the depthwise convs FP (quant.fp_kinds): they are FP rows."""
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(tmp_path, "s.json")
    args = [
        "--config",
        os.path.join(root, "configs/default.py"),
        "--num_classes=10",
        f"--json={out}",
    ]
    assert summary_cli.main(summary_cli.parse_flags(["qat_jax.summary", *args])) == 0
    assert "binary=all but depthwise" in capsys.readouterr().out
    rows = json.load(open(out))["layers"]
    depthwise = [r for r in rows if r["kind"].startswith("depthwise")]
    assert depthwise and not any(r["binary"] for r in depthwise)
    assert any(r["binary"] for r in rows if r["kind"].startswith("conv"))
    # --binary=all still counts every quantizable layer.
    args[-1] = f"--json={out}2"
    assert (
        summary_cli.main(summary_cli.parse_flags(["qat_jax.summary", *args, "--binary=all"])) == 0
    )
    assert all(
        r["binary"]
        for r in json.load(open(out + "2"))["layers"]
        if r["kind"].startswith("depthwise")
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Exactly one of (workdir, config) must have a value"),
        (["--workdir=a", "--config=b"], "Exactly one of (workdir, config) must have a value"),
        (["--config=b", "--binary=some"], "--binary=some: value should be one of"),
    ],
    ids=["neither", "both", "bad_binary"],
)
def test_cli_bad_flags_are_one_line_errors_with_exit_code_2(capsys, args, message):
    flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as exc:
        summary_cli.parse_flags(["qat_jax.summary", *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err


def test_other_parametrised_modules_are_fp_rows():
    """ReActNet's RPReLU (3 float32 per channel) appears as an FP row without MACs."""
    model = MobileNetV2(**TINY, rprelu=True)
    variables = init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    s = summary.model_summary(model, variables, (8, 8, 1), binary="all")
    rows = {r.name: r for r in s.rows if r.kind == "rprelu"}
    assert {k: r.params for k, r in rows.items()} == {
        "block0/depthwise_act/rprelu": 3 * 8,
        "head_act/rprelu": 3 * 16,
    }
    assert s.params == 586 + 72 and s.bops == 16896 and s.flops == 4768


def test_binary_shortcut_changes_no_row(tiny):
    """The shortcut has no parameters, and its adds/pools are not counted, like BN and residuals."""
    model, variables = tiny
    with_shortcut = MobileNetV2(**TINY, binary_shortcut=True)
    for binary in ("all", "none"):
        a = summary.model_summary(model, variables, (8, 8, 1), binary=binary)
        b = summary.model_summary(with_shortcut, variables, (8, 8, 1), binary=binary)
        assert b.rows == a.rows and b.totals() == a.totals()
