"""Tests of the model zoo (``qat_jax.models``).

Full-size models are only traced (``jax.eval_shape``: parameter counts, shapes, layer structure);
everything that computes uses reduced widths/depths and 16x16 inputs to stay fast on a CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale, assert_logits_match
from test_shortcut import _pool_by_hand  # the numpy reference of the 2x2 ceil-mode pool

from qat_jax import models
from qat_jax.layers import BINARIZING, BinaryConv, QuantConfig
from qat_jax.models import MobileNetV2, QLayer, ResNet18, ResNet20
from qat_jax.models.common import _make_divisible

# Reduced MobileNetV2-CIFAR: width 0.25 -> stem 8 channels, every stage _make_divisible(c/4, 8) =
# 8 channels; block0 (t=1: depthwise + project), block1 (stride 2), block2 (identity residual),
# block3 (stride 2), head_conv -> 64.
SMALL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))
SMALL_KW = dict(
    num_classes=10,
    width_mult=0.25,
    variant="cifar",
    dropout_rate=0.0,
    inverted_residual_setting=SMALL_SETTING,
    last_channel=64,
)
# (expand ratio t, output channels, stride) of each block of the reduced model, by hand.
SMALL_BLOCKS = ((1, 8, 1), (6, 8, 2), (6, 8, 1), (6, 8, 2))
FAST_QUANT = QuantConfig(transform=False)  # cheaper binarizing branch to compile
X_SHAPE = (2, 16, 16, 3)
# Our models vs a plain-Flax reference / the 'cpu' vs 'xla' conv paths: the same float32 math in
# another summation order (shifted taps vs lax.conv, fused BN). Bounded by 1e-5 of the compared
# tensor's largest magnitude (observed ~1e-7 of it): rounding passes, a wrong weight or a
# missing BN term (a whole-percent change) does not.
MODEL_REL = 1e-5


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` without LLVM's backend optimisations.

    These tests are compile-bound (every binary layer compiles its three weight paths), and the
    unoptimised build compiles several times faster while computing the same function.
    """
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _param_count(model, input_shape) -> int:
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape), train=False)
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def _abstract_variables(model, input_shape) -> dict:
    return jax.eval_shape(
        lambda: models.init_variables(model, jax.random.PRNGKey(0), input_shape, jit=False)
    )


def _qstate_paths(tree, prefix=()) -> list[tuple[str, ...]]:
    """Module paths owning ``block`` in a (possibly abstract) ``qstate`` tree."""
    out = [prefix] if "block" in tree else []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.extend(_qstate_paths(value, prefix + (key,)))
    return out


def _randomize(variables: dict, seed: int = 1) -> dict:
    """Random BN scale/bias/statistics and classifier bias, so the comparisons are not trivial."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), leaf.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return leaf

    out = dict(variables)
    for col in ("params", "batch_stats"):
        out[col] = jax.tree_util.tree_map_with_path(fill, variables[col])
    return out


def _set_modes(variables: dict, w_mode: int, a_mode: int) -> dict:
    def fill(path, leaf):
        name = path[-1].key
        if name == "w_mode":
            return jnp.full_like(leaf, w_mode)
        if name == "a_mode":
            return jnp.full_like(leaf, a_mode)
        return leaf

    return {**variables, "qstate": jax.tree_util.tree_map_with_path(fill, variables["qstate"])}


def _binary_conv_calls(model, variables, x) -> list[tuple[str, ...]]:
    """Paths of the BinaryConv modules in the order the forward pass calls them."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, BinaryConv) and context.method_name == "__call__":
            calls.append(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, z: model.apply(v, z, train=False), variables, x)
    return calls


# ---------------------------------------------------------------------------------------------
# Plain Flax references (nn.Conv with explicit symmetric padding, nn.BatchNorm), named like the
# zoo's modules so the zoo's variables apply to them unchanged.


def _ref_bn(train, name):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _ref_conv(features, k, stride=1, groups=1, name=None):
    p = k // 2
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        feature_group_count=groups,
        use_bias=False,
        precision=jax.lax.Precision.HIGHEST,
        name=name,
    )


class RefMobileNetV2(nn.Module):
    stem: int
    blocks: tuple
    last: int
    num_classes: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu6(_ref_bn(train, "stem_bn")(_ref_conv(self.stem, 3, name="stem")(x)))
        for i, (t, c, s) in enumerate(self.blocks):
            x = RefInvertedResidual(t, c, s, name=f"block{i}")(x, train)
        x = _ref_conv(self.last, 1, name="head_conv")(x)
        x = nn.relu6(_ref_bn(train, "head_bn")(x))
        return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


class RefInvertedResidual(nn.Module):
    t: int
    c: int
    s: int

    @nn.compact
    def __call__(self, x, train):
        hidden = x.shape[-1] * self.t
        y = x
        if self.t != 1:
            y = nn.relu6(_ref_bn(train, "expand_bn")(_ref_conv(hidden, 1, name="expand")(y)))
        y = _ref_conv(hidden, 3, self.s, groups=hidden, name="depthwise")(y)
        y = nn.relu6(_ref_bn(train, "depthwise_bn")(y))
        y = _ref_bn(train, "project_bn")(_ref_conv(self.c, 1, name="project")(y))
        return y + x if self.s == 1 and x.shape[-1] == self.c else y


class RefResNet20(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(_ref_bn(train, "stem_bn")(_ref_conv(16, 3, name="stem")(x)))
        i = 0
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for j in range(3):
                x = RefBasicBlock(width, stride if j == 0 else 1, name=f"block{i}")(x, train)
                i += 1
        return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


class RefBasicBlock(nn.Module):
    c: int
    s: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.relu(_ref_bn(train, "bn1")(_ref_conv(self.c, 3, self.s, name="conv1")(x)))
        y = _ref_bn(train, "bn2")(_ref_conv(self.c, 3, name="conv2")(y))
        if self.s != 1 or x.shape[-1] != self.c:
            x = _ref_bn(train, "shortcut_bn")(_ref_conv(self.c, 1, self.s, name="shortcut")(x))
        return nn.relu(y + x)


# ---------------------------------------------------------------------------------------------
# Fixtures: one real init per model, shared.


@pytest.fixture(scope="module")
def small_mbv2():
    model = MobileNetV2(quant=FAST_QUANT, **SMALL_KW)
    variables = models.init_variables(model, jax.random.PRNGKey(0), (1, *X_SHAPE[1:]))
    return model, variables


@pytest.fixture(scope="module")
def resnet20():
    model = ResNet20(quant=FAST_QUANT)
    variables = models.init_variables(model, jax.random.PRNGKey(0), (1, *X_SHAPE[1:]))
    return model, variables


@pytest.fixture(scope="module")
def x_input():
    return jnp.asarray(np.random.default_rng(0).normal(size=X_SHAPE), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Parameter counts and shapes (traced only).


def test_make_divisible_matches_torchvision():
    assert _make_divisible(32 * 1.0, 8) == 32
    assert _make_divisible(32 * 0.25, 8) == 8
    assert _make_divisible(24 * 0.25, 8) == 8
    assert _make_divisible(1280 * 1.4, 8) == 1792
    assert _make_divisible(96 * 0.35, 8) == 32  # 33.6 -> 32
    assert _make_divisible(16 * 0.35, 8) == 8  # never below 90% of v: 5.6 -> 8


def test_mobilenetv2_param_count_matches_torchvision():
    # torchvision.models.mobilenet_v2(): sum(p.numel() for p in m.parameters()) == 3,504,872.
    assert _param_count(MobileNetV2(), (1, 224, 224, 3)) == 3_504_872


def test_resnet18_param_count_matches_torchvision():
    # torchvision.models.resnet18(): 11,689,512 parameters.
    assert _param_count(ResNet18(), (1, 64, 64, 3)) == 11_689_512


def test_resnet20_param_count():
    # stem 3*3*3*16 + BN 2*16                                              =     464
    # stage 1: 3 blocks x (2 convs 3*3*16*16 + 2 BN 2*16)  = 3 x 4,672    =  14,016
    # stage 2: first 3*3*16*32 + 3*3*32*32 + 2 BN 2*32 + shortcut 16*32 + BN 2*32
    #          = 4,608 + 9,216 + 128 + 512 + 64 = 14,528; 2 more x 18,560 =  51,648
    # stage 3: 3*3*32*64 + 3*3*64*64 + 2 BN 2*64 + shortcut 32*64 + BN 2*64
    #          = 18,432 + 36,864 + 256 + 2,048 + 128 = 57,728; 2 x 73,984  = 205,696
    # classifier 64*10 + 10                                                =     650
    # total                                                                = 272,474
    # (option A, parameter-free shortcuts, would be 272,474 - 2,752 = 269,722.)
    assert _param_count(ResNet20(), (1, 32, 32, 3)) == 272_474


@pytest.mark.parametrize(
    "model, input_shape, out_shape, head_shape",
    [
        # ImageNet layout: 224 -> 7x7 before the head; CIFAR layout: 32 -> 4x4.
        (MobileNetV2(), (2, 224, 224, 3), (2, 1000), (7, 7, 1280)),
        (
            MobileNetV2(num_classes=10, width_mult=0.5, variant="cifar"),
            (2, 32, 32, 3),
            (2, 10),
            (4, 4, 1280),
        ),
        (
            MobileNetV2(num_classes=10, width_mult=0.5, variant="cifar"),
            (2, 32, 32, 1),
            (2, 10),
            (4, 4, 1280),
        ),
        (MobileNetV2(**SMALL_KW), (3, 32, 32, 1), (3, 10), (8, 8, 64)),
        (ResNet20(), (2, 32, 32, 3), (2, 10), None),
        (ResNet20(num_classes=7, dtype=jnp.bfloat16), (2, 32, 32, 1), (2, 7), None),
        (ResNet18(), (2, 64, 64, 3), (2, 1000), None),
    ],
    ids=["mbv2-imagenet", "mbv2-cifar-rgb", "mbv2-cifar-gray", "mbv2-small"]
    + ["r20", "r20-gray-bf16", "r18"],
)
def test_output_shapes(model, input_shape, out_shape, head_shape):
    head = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == "head_conv":
            head.append(out.shape[1:])
        return out

    def run():
        x = jnp.zeros(input_shape)
        variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
        out_eval = model.apply(variables, x, train=False)
        out_train, _ = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
        )
        return out_eval, out_train

    with nn.intercept_methods(interceptor):
        out_eval, out_train = jax.eval_shape(run)
    assert out_eval.shape == out_shape and out_eval.dtype == jnp.float32
    assert out_train.shape == out_shape and out_train.dtype == jnp.float32
    if head_shape is not None:
        assert set(head) == {head_shape}


# ---------------------------------------------------------------------------------------------
# Layer structure.


def test_full_mobilenetv2_quantizable_structure():
    # 17 inverted residuals: block0 (t=1) has depthwise + project (2 convs), the other 16 have
    # expand + depthwise + project (48), plus head_conv: 2 + 48 + 1 = 51 binary convs.
    model = MobileNetV2()
    assert model.num_blocks() == 17
    variables = _abstract_variables(model, (1, 32, 32, 3))
    paths = set(_qstate_paths(variables["qstate"]))  # (eval_shape outputs have sorted keys)
    assert len(paths) == 51
    assert ("block0", "expand") not in paths and ("block1", "expand") in paths
    assert {("block16", "project"), ("head_conv",)} <= paths
    assert not any(p[0] in ("stem", "classifier") for p in paths)
    assert sorted(variables) == ["batch_stats", "binary", "calib", "params", "qstate", "quant"]


def test_resnet18_quantizable_structure():
    # 8 BasicBlocks x 2 convs + 3 down-sampling shortcuts = 19 binary convs.
    variables = _abstract_variables(ResNet18(), (1, 64, 64, 3))
    paths = _qstate_paths(variables["qstate"])
    assert len(paths) == 19
    shortcuts = {p for p in paths if p[-1] == "shortcut"}
    assert shortcuts == {("block2", "shortcut"), ("block4", "shortcut"), ("block6", "shortcut")}
    assert variables["params"]["stem"]["kernel"].shape == (7, 7, 3, 64)


def _check_layer_list(layers, calls, n_blocks):
    assert [q.path for q in layers] == calls
    ids = [q.block_id for q in layers]
    assert ids == sorted(ids)
    assert sorted(set(ids)) == list(range(n_blocks))
    assert all(isinstance(q, QLayer) for q in layers)
    assert not any(q.path[0] in ("stem", "classifier") for q in layers)


def test_quantizable_layers_mobilenetv2(small_mbv2, x_input):
    model, variables = small_mbv2
    layers = models.quantizable_layers(variables)
    calls = _binary_conv_calls(model, variables, x_input)
    assert len(calls) == 2 + 3 * 3 + 1
    _check_layer_list(layers, calls, model.num_blocks() + 1)
    for q in layers:
        expected = {"depthwise": "depthwise", "expand": "pointwise", "project": "pointwise"}
        assert q.kind == expected.get(q.path[-1], "pointwise")
        if q.path == ("head_conv",):
            assert q.block_id == model.num_blocks() == 4
        else:
            assert q.block_id == int(q.path[0][len("block") :])
    # Robust to dicts whose keys were sorted by a pytree round trip (block10 < block2, ...).
    assert models.quantizable_layers(jax.tree.map(lambda a: a, variables)) == layers


def test_quantizable_layers_resnet20(resnet20, x_input):
    model, variables = resnet20
    layers = models.quantizable_layers(variables)
    calls = _binary_conv_calls(model, variables, x_input)
    assert len(calls) == 9 * 2 + 2
    _check_layer_list(layers, calls, 9)
    kinds = {q.path: q.kind for q in layers}
    assert kinds[("block3", "shortcut")] == "pointwise" and kinds[("block3", "conv1")] == "conv"
    assert models.quantizable_layers(jax.tree.map(lambda a: a, variables)) == layers


def test_init_variables_collections_and_order(small_mbv2):
    _, variables = small_mbv2
    # (transform=False: no ``calib`` collection; input_stats/losses are dropped.)
    assert set(variables) == {"params", "batch_stats", "qstate", "quant", "binary"}
    # Creation (forward) order is kept even though the init is jitted.
    assert list(variables["params"]) == [
        "stem",
        "stem_bn",
        "block0",
        "block1",
        "block2",
        "block3",
        "head_conv",
        "head_bn",
        "classifier",
    ]
    assert list(variables["params"]["block1"]) == [
        "expand",
        "expand_bn",
        "depthwise",
        "depthwise_bn",
        "project",
        "project_bn",
    ]
    assert variables["params"]["block1"]["depthwise"]["kernel"].shape == (3, 3, 1, 48)
    assert "kernel" in variables["params"]["stem"] and "stem" not in variables["qstate"]


# ---------------------------------------------------------------------------------------------
# Numerics.


def _compare_with_reference(model, ref, variables, x):
    variables = _randomize(variables)
    ref_vars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    ref_shapes = jax.eval_shape(lambda: ref.init(jax.random.PRNGKey(0), x, train=False))
    assert jax.tree.structure(ref_shapes) == jax.tree.structure(ref_vars)

    def both(v, rv, z):
        out = model.apply(v, z, train=False)
        out_t, new = model.apply(v, z, train=True, mutable=["batch_stats"])
        ref_out = ref.apply(rv, z, train=False)
        ref_t, ref_new = ref.apply(rv, z, train=True, mutable=["batch_stats"])
        return (out, out_t, new["batch_stats"]), (ref_out, ref_t, ref_new["batch_stats"])

    ours, theirs = _compile(both, variables, ref_vars, x)(variables, ref_vars, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert_close_to_scale(a, b, MODEL_REL)
    # Train and eval mode really differ (batch vs running statistics).
    assert not np.allclose(np.asarray(ours[0]), np.asarray(ours[1]), atol=1e-3)


def test_fp_mobilenetv2_equals_plain_flax(small_mbv2, x_input):
    model, variables = small_mbv2
    ref = RefMobileNetV2(stem=8, blocks=SMALL_BLOCKS, last=64, num_classes=10)
    _compare_with_reference(model, ref, variables, x_input)


def test_fp_resnet20_equals_plain_flax(resnet20, x_input):
    model, variables = resnet20
    _compare_with_reference(model, RefResNet20(), variables, x_input)


def test_conv_impl_cpu_matches_xla(small_mbv2, x_input):
    model, variables = small_mbv2
    variables = _randomize(variables)
    outs = {}
    for impl in ("cpu", "xla"):
        m = model.clone(conv_impl=impl)
        f = _compile(lambda v, z, m=m: m.apply(v, z, train=False), variables, x_input)
        outs[impl] = [f(variables, x_input), f(_set_modes(variables, BINARIZING, 1), x_input)]
    assert_logits_match(outs["cpu"][0], outs["xla"][0], MODEL_REL, err_msg="fp")
    # Binary: a pre-sign value within rounding of tau may flip one activation between the paths.
    assert_logits_match(outs["cpu"][1], outs["xla"][1], 10 * MODEL_REL, err_msg="binary")


@pytest.mark.slow
def test_binarizing_mode_has_finite_gradients(x_input):
    model = MobileNetV2(**{**SMALL_KW, "inverted_residual_setting": SMALL_SETTING[:2]})
    variables = models.init_variables(model, jax.random.PRNGKey(2), (1, *X_SHAPE[1:]))
    variables = _set_modes(variables, BINARIZING, 1)
    labels = jnp.array([1, 7])
    trainable = {"params": variables["params"], "quant": variables["quant"]}
    state = {k: v for k, v in variables.items() if k not in trainable}

    def loss_and_grad(tr):
        def loss_fn(t):
            logits, new = model.apply(
                {**t, **state}, x_input, train=True, mutable=["batch_stats", "losses"]
            )
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
            info = sum(jnp.sum(v) for v in jax.tree.leaves(new["losses"]))
            return ce + 0.1 * info, info

        return jax.value_and_grad(loss_fn, has_aux=True)(tr)

    (loss, info), grads = _compile(loss_and_grad, trainable)(trainable)
    assert np.isfinite(float(loss)) and float(info) > 0.0  # binarizing layers sow their error
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
    for q in models.quantizable_layers(variables):
        gq = grads["quant"]
        for key in q.path:
            gq = gq[key]
        gk = grads["params"]
        for key in q.path:
            gk = gk[key]
        assert np.any(np.asarray(gk["kernel"]) != 0), q.path
        assert set(gq) == {"tau", "P", "rho"}
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["quant"]))


def test_bn_axis_name_is_used():
    model = ResNet20(bn_axis_name="batch")
    x = jnp.zeros((2, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))

    def train_apply(v, z):
        return model.apply(v, z, train=True, mutable=["batch_stats"])[0]

    # Synchronised BN needs the named axis: fine under vmap(axis_name=...), an error without.
    batched = jax.vmap(train_apply, in_axes=(None, 0), axis_name="batch")
    out = jax.eval_shape(batched, variables, jnp.zeros((4, *x.shape)))
    assert out.shape == (4, 2, 10)
    with pytest.raises(NameError):
        jax.eval_shape(train_apply, variables, x)


# ---------------------------------------------------------------------------------------------
# Registry.


def test_create_model_registry():
    assert isinstance(models.create_model("mobilenetv2", num_classes=10), MobileNetV2)
    assert isinstance(models.create_model("ResNet20"), ResNet20)
    m = models.create_model("resnet18", num_classes=5, conv_impl="xla")
    assert isinstance(m, ResNet18) and m.num_classes == 5 and m.conv_impl == "xla"
    with pytest.raises(ValueError, match="mobilenetv2, resnet18, resnet20"):
        models.create_model("vgg16")


def test_invalid_configs_raise():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="variant"):
        jax.eval_shape(
            lambda: MobileNetV2(variant="tiny").init(jax.random.PRNGKey(0), x, train=False)
        )
    with pytest.raises(ValueError, match="inverted_residual_setting"):
        jax.eval_shape(
            lambda: MobileNetV2(inverted_residual_setting=((1, 16, 1),)).init(
                jax.random.PRNGKey(0), x, train=False
            )
        )
    with pytest.raises(ValueError, match="quantizable_layers needs concrete"):
        models.quantizable_layers(_abstract_variables(ResNet20(), (1, 8, 8, 3)))


# ---------------------------------------------------------------------------------------------
# The real-valued shortcut around every binary conv (``binary_shortcut``).


def _np_match(z: np.ndarray, c_out: int) -> np.ndarray:
    """Channel matching by hand: output k is the mean of inputs floor(k C/c) .. ceil((k+1) C/c)-1."""
    c_in = z.shape[-1]
    cols = []
    for k in range(c_out):
        lo, hi = (k * c_in) // c_out, -(-((k + 1) * c_in) // c_out)
        cols.append(z[..., lo:hi].mean(-1))
    return np.stack(cols, axis=-1)


def _np_block(x: np.ndarray, t: int, c_out: int, stride: int) -> np.ndarray:
    """An inverted residual whose convs are all zero: only the shortcuts (and residual) remain."""
    relu6 = lambda z: np.clip(z, 0.0, 6.0)  # noqa: E731
    h = x if t == 1 else relu6(_np_match(x, int(round(x.shape[-1] * t))))
    h = relu6(_pool_by_hand(h) if stride == 2 else h)
    y = _np_match(h, c_out)
    return y + x if stride == 1 and x.shape[-1] == c_out else y


def _zero_binary_kernels(model, variables):
    """Every BinaryConv kernel set to zero (stem and classifier untouched); BN left at init, where
    eval mode is the identity (scale 1, bias 0, mean 0, var 1), so BN(conv(x)) = 0 exactly."""
    v = jax.tree.map(np.array, variables)
    for q in models.quantizable_layers(v):
        node = v["params"]
        for k in q.path:
            node = node[k]
        node["kernel"] = np.zeros_like(node["kernel"])
    return v


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize(
    "c_in, t, c_out, stride, size",
    [
        (8, 6, 16, 2, 8),  # expand repeat x6, 2x2 pool, project mean of 3
        (8, 6, 8, 1, 6),  # project mean of 6, plus the block's identity residual
        (8, 1, 16, 1, 5),  # no expand; project 8 -> 16 repeats
        (8, 3, 16, 2, 7),  # project 24 -> 16 (unequal groups), pool of an odd size
    ],
)
def test_shortcut_block_with_zero_convs_is_the_matched_input(c_in, t, c_out, stride, size, rng):
    from qat_jax.models.mobilenetv2 import InvertedResidual

    block = InvertedResidual(
        features=c_out, strides=stride, expand_ratio=t, block_id=0, binary_shortcut=True
    )
    x = (4.0 * rng.normal(size=(2, size, size, c_in))).astype(np.float32)  # both ReLU6 sides
    v = _zero_binary_kernels(block, models.init_variables(block, jax.random.PRNGKey(0), x.shape))
    plain = block.clone(binary_shortcut=False)
    got, got_plain = _compile(
        lambda v, z: (block.apply(v, z, train=False), plain.apply(v, z, train=False)), v, x
    )(v, x)
    _close(got, _np_block(x.astype(np.float64), t, c_out, stride))
    # Without the option the same variables give the plain block: zero (plus the residual).
    want_plain = x if stride == 1 and c_in == c_out else np.zeros_like(np.asarray(got))
    np.testing.assert_array_equal(got_plain, want_plain)


def test_shortcut_model_with_zero_convs_by_hand(rng):
    """The whole reduced model: stem output -> the blocks' and head's shortcuts -> classifier."""
    model = MobileNetV2(**{**SMALL_KW, "last_channel": 40}, binary_shortcut=True)
    v = _zero_binary_kernels(model, models.init_variables(model, jax.random.PRNGKey(0), X_SHAPE))
    v["params"]["classifier"]["bias"] = rng.normal(size=10).astype(np.float32)
    x = rng.normal(size=X_SHAPE).astype(np.float32)
    logits, inter = _compile(
        lambda v, z: model.apply(
            v, z, train=False, capture_intermediates=lambda m, _: m.name == "stem_bn"
        ),
        v,
        x,
    )(v, x)
    h = np.clip(np.asarray(inter["intermediates"]["stem_bn"]["__call__"][0], np.float64), 0, 6)
    for t, c_out, stride in SMALL_BLOCKS:
        h = _np_block(h, t, c_out, stride)
    h = np.clip(_np_match(h, 40), 0, 6).mean(axis=(1, 2))  # head 8 -> 40: unequal groups
    cls = v["params"]["classifier"]
    _close(logits, h @ cls["kernel"] + cls["bias"])


def test_shortcut_adds_no_variables_and_keeps_the_layer_list(small_mbv2):
    model, variables = small_mbv2
    on = model.clone(binary_shortcut=True)
    v_on = models.init_variables(on, jax.random.PRNGKey(0), (1, *X_SHAPE[1:]))
    assert jax.tree.structure(v_on) == jax.tree.structure(variables)
    assert [a.shape for a in jax.tree.leaves(v_on)] == [b.shape for b in jax.tree.leaves(variables)]
    assert models.quantizable_layers(v_on) == models.quantizable_layers(variables)
    # Full size (traced only), where projects like 144 -> 32 have unequal channel groups.
    plain = MobileNetV2(variant="cifar", num_classes=100)
    shape = (1, 32, 32, 3)
    assert _param_count(plain.clone(binary_shortcut=True), shape) == _param_count(plain, shape)


def test_shortcut_changes_the_function(small_mbv2, x_input):
    model, variables = small_mbv2
    variables = _randomize(variables)
    on = model.clone(binary_shortcut=True)
    v = _set_modes(variables, BINARIZING, 1)
    a, b = _compile(
        lambda v, z: (model.apply(v, z, train=False), on.apply(v, z, train=False)), v, x_input
    )(v, x_input)
    assert np.all(np.isfinite(b)) and np.abs(a - b).max() > 1e-3 * np.abs(a).max()


# ---------------------------------------------------------------------------------------------
# static_fp: the FP network without the per-layer switches (the KD teacher's forward pass).


@pytest.mark.parametrize("name", ["mobilenetv2_rprelu_shortcut", "resnet20"])
def test_static_fp_is_the_fp_model_and_ignores_modes(name, x_input):
    """From FP variables (every mode 0) ``static_fp(model)`` computes ``model``'s logits, in both
    BN modes, with RPReLU and the real-valued shortcuts on; with any other modes it still
    computes the FP network, while ``model`` computes something else."""
    if name == "resnet20":
        model = ResNet20(quant=FAST_QUANT, rprelu=True)
    else:
        model = MobileNetV2(quant=FAST_QUANT, rprelu=True, binary_shortcut=True, **SMALL_KW)
    variables = _randomize(models.init_variables(model, jax.random.PRNGKey(3), (1, *X_SHAPE[1:])))
    static = models.static_fp(model)
    binary = _set_modes(variables, BINARIZING, 1)

    def outputs(m, v, z):
        return m.apply(v, z, train=False), m.apply(v, z, train=True, mutable=["batch_stats"])[0]

    want = _compile(lambda v, z: outputs(model, v, z), variables, x_input)(variables, x_input)
    f = _compile(lambda v, z: outputs(static, v, z), variables, x_input)
    for modes in (variables, binary):
        for a, b in zip(f(modes, x_input), want, strict=True):
            assert_logits_match(a, b, MODEL_REL, err_msg=name)
    binary_out = _compile(lambda v, z: outputs(model, v, z), binary, x_input)(binary, x_input)
    assert not np.allclose(np.asarray(binary_out[0]), np.asarray(want[0]), atol=1e-2)


def test_static_fp_traces_no_switch(small_mbv2, x_input):
    model, variables = small_mbv2

    def primitives(m):
        jaxpr = jax.make_jaxpr(lambda v, z: m.apply(v, z, train=False))(variables, x_input)
        return str(jaxpr)

    assert " cond[" in primitives(model)  # the check can fail: the switched model has them
    assert " cond[" not in primitives(models.static_fp(model))


def test_static_fp_needs_a_zoo_model():
    with pytest.raises(ValueError, match="zoo model with a `quant` option"):
        models.static_fp(nn.Dense(3))
