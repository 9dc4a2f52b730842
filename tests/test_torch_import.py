"""PyTorch interop: torchvision-layout state_dicts (.pth, .safetensors) -> our Flax models.

The torchvision modules are rebuilt here with plain ``torch.nn`` (same module names and padding as
torchvision's ``mobilenet_v2``/``resnet18``), with random weights and random BN running
statistics, in eval mode; our models must give the same logits after the import, to float32
rounding scaled to the logits' size (``TORCH_REL`` below) and with the same predictions.

``QAT_JAX_TEST_TORCH_THREADS`` sets torch's intra-op threads (default: torch's own choice) so that
the parity can be checked single- and multi-threaded (see the note of the CI issue).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
if os.environ.get("QAT_JAX_TEST_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["QAT_JAX_TEST_TORCH_THREADS"]))

from numerics import assert_logits_match  # noqa: E402

from qat_jax import interop  # noqa: E402
from qat_jax.layers import QuantConfig  # noqa: E402
from qat_jax.models import MobileNetV2, ResNet18, init_variables  # noqa: E402
from qat_jax.models.common import _make_divisible  # noqa: E402

# transform=False: the import touches only params/batch_stats; the FP forward is the same and
# compiles faster without the Cayley branch.
QCFG = QuantConfig(transform=False)

# JAX vs PyTorch logits: both are float32 convolutions with another summation order (XLA's and
# oneDNN/ATen's kernels, their thread split), so they differ by rounding that grows with the size
# of the sums, not with each logit: ResNet-18's logits reach ~200 here, and an absolute 1e-4 failed
# on a logit of 0.15 that carried the rounding of the large ones. Measured on the 2-core CI machine,
# 5 runs each single-threaded (XLA eigen off, torch 1 thread) and multi-threaded (defaults, torch 2
# threads): max|jax - torch| / max|torch| = 3.9e-6 / 2.9e-6 (MobileNetV2, 17 blocks) and
# 6.2e-7 (ResNet-18), identical across runs. 3e-5 of the largest logit leaves a margin of 7x over
# the worst of these and still fails on any wrong or missing weight (those move logits by whole
# percents).
TORCH_REL = 3e-5


# --- torchvision layouts in plain torch.nn ---------------------------------------------------


class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )


class TorchInvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = int(round(cin * t))
        self.use_res = stride == 1 and cin == cout
        layers = [ConvBNAct(cin, hidden, 1)] if t != 1 else []
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class TorchMobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2's layout (stem stride and input channels configurable)."""

    def __init__(self, num_classes, setting, width=1.0, last_channel=None, stem_stride=2, cin=3):
        super().__init__()
        ch = _make_divisible(32 * width, 8)
        last = last_channel or _make_divisible(1280 * max(1.0, width), 8)
        feats = [ConvBNAct(cin, ch, 3, stem_stride)]
        for t, c, n, s in setting:
            out = _make_divisible(c * width, 8)
            for i in range(n):
                feats.append(TorchInvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        feats.append(ConvBNAct(ch, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


class TorchBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet18(nn.Module):
    """torchvision.models.resnet18's layout."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for s, (w, stride) in enumerate(
            zip((64, 128, 256, 512), (1, 2, 2, 2), strict=True), start=1
        ):
            setattr(
                self,
                f"layer{s}",
                nn.Sequential(TorchBasicBlock(cin, w, stride), TorchBasicBlock(w, w, 1)),
            )
            cin = w
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize(module, seed):
    """Random weights and BN running statistics (eval mode), so BN import is really checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1:  # BN scale and bias, linear bias
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = int(np.prod(t.shape[1:]))
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return module.eval()


def torch_logits(module, x_nhwc):
    with torch.no_grad():
        return module(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def jax_logits(model, variables, x):
    # One-off program: skip LLVM's backend optimisation (as init_variables does); same numbers.
    fn = jax.jit(lambda v, z: model.apply(v, z, train=False)).lower(variables, x)
    return np.asarray(fn.compile({"xla_backend_optimization_level": 0})(variables, x))


def fp_variables(model, input_shape):
    """Variables of ``model`` in FP mode without running its (slow, 3.5 M-parameter) random init.

    Every collection is zeros of the right shape: ``params``/``batch_stats`` are overwritten by
    the import, and all-zero modes (``w_mode = a_mode = 0``) are the FP model.
    """
    shapes = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros(input_shape, jnp.float32), train=False),
        jax.random.PRNGKey(0),
    )
    return {
        col: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)
        for col, tree in shapes.items()
        if col not in ("input_stats", "losses")
    }


def tiny_mobilenetv2():
    """Our side of the tiny torchvision-layout MobileNetV2 the writer/error tests use."""
    return MobileNetV2(
        num_classes=10,
        variant="cifar",
        width_mult=0.25,
        last_channel=16,
        inverted_residual_setting=((1, 8, 1, 1), (2, 8, 1, 2)),
        quant=QCFG,
    )


def _param_count(variables):
    return sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mobilenetv2_imagenet_from_pth_matches_torch(tmp_path, rng):
    tmod = randomize(
        TorchMobileNetV2(
            1000,
            (
                (1, 16, 1, 1),
                (6, 24, 2, 2),
                (6, 32, 3, 2),
                (6, 64, 4, 2),
                (6, 96, 3, 1),
                (6, 160, 3, 2),
                (6, 320, 1, 1),
            ),
        ),
        0,
    )
    path = os.path.join(tmp_path, "mnv2.pth")
    torch.save(tmod.state_dict(), path)
    model = MobileNetV2(num_classes=1000, variant="imagenet", quant=QCFG)
    variables = fp_variables(model, (1, 64, 64, 3))
    assert _param_count(variables) == 3_504_872  # torchvision's mobilenet_v2
    loaded = interop.load_torchvision_file(path, model, variables)
    x = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    want = torch_logits(tmod, x)
    got = jax_logits(model, loaded, x)
    assert np.abs(want).max() > 0.1  # a non-degenerate comparison
    assert_logits_match(got, want, TORCH_REL)
    # The way back gives torch the same tensors (strict load, bit-identical).
    back = interop.to_torchvision_state_dict(model, loaded)
    for k, v in tmod.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], v.numpy())


@pytest.mark.slow
def test_resnet18_from_safetensors_matches_torch(tmp_path, rng):
    from safetensors.torch import save_file

    tmod = randomize(TorchResNet18(1000), 1)
    path = os.path.join(tmp_path, "r18.safetensors")
    save_file(tmod.state_dict(), path)  # the official writer; read back with our numpy reader
    model = ResNet18(num_classes=1000, quant=QCFG)
    variables = fp_variables(model, (1, 64, 64, 3))
    assert _param_count(variables) == 11_689_512  # torchvision's resnet18
    loaded = interop.load_torchvision_file(path, model, variables)
    x = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    want = torch_logits(tmod, x)
    assert np.abs(want).max() > 0.1  # a non-degenerate comparison
    assert_logits_match(jax_logits(model, loaded, x), want, TORCH_REL)


def test_our_safetensors_writer_is_read_by_torch(tmp_path):
    from safetensors.torch import load_file

    tmod = TorchMobileNetV2(
        10, ((1, 8, 1, 1), (2, 8, 1, 2)), width=0.25, last_channel=16, stem_stride=1, cin=1
    )
    model = tiny_mobilenetv2()
    variables = init_variables(model, jax.random.PRNGKey(3), (1, 8, 8, 1))
    path = os.path.join(tmp_path, "ours.safetensors")
    interop.save_torchvision_safetensors(path, model, variables)
    sd = load_file(path)
    missing, unexpected = tmod.load_state_dict(sd, strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    np.testing.assert_array_equal(
        sd["features.0.0.weight"].numpy(),
        np.asarray(variables["params"]["stem"]["kernel"]).transpose(3, 2, 0, 1),
    )


def test_mismatched_state_dict_lists_every_bad_key():
    model = tiny_mobilenetv2()
    variables = init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    sd = interop.to_torchvision_state_dict(model, variables)
    del sd["features.2.conv.1.1.running_var"]
    sd["features.9.extra.weight"] = np.zeros(3, np.float32)
    sd["classifier.1.weight"] = np.zeros((1000, 16), np.float32)
    sd["features.0.1.num_batches_tracked"] = np.zeros((), np.int64)  # accepted, ignored
    with pytest.raises(interop.TorchImportError) as e:
        interop.load_torchvision(sd, model, variables)
    msg = str(e.value)
    assert "1 missing key(s): features.2.conv.1.1.running_var" in msg
    assert "1 unexpected key(s): features.9.extra.weight" in msg
    assert "classifier.1.weight: got (1000, 16), expected (10, 16)" in msg


def test_trainer_accepts_torch_weight_files_as_init(tmp_path):
    from qat_jax.experiment import ConfigError, validate_config
    from qat_jax.train.config_files import load_config_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config_file(os.path.join(root, "configs/tiny.py"))
    c.unlock()
    path = os.path.join(tmp_path, "fp.pth")
    c.init = path
    with pytest.raises(ConfigError, match="does not exist"):
        validate_config(c, 8)
    torch.save({"features.0.0.weight": torch.zeros(1)}, path)
    validate_config(c, 8)  # accepted; a bad state_dict is reported when the run loads it
