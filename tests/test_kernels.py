"""The compiled depthwise kernel (``qat_jax.kernels``): built once per machine, registered with XLA,
equal to ``lax.conv`` in value and gradient wherever ``ops.conv2d(..., impl='cpu_ffi')`` routes a
conv to it, and a clear one-line error where it cannot be built.

(``tests/test_ops.py`` runs ``'cpu_ffi'`` through every conv case of the other impls.)
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale, assert_logits_match

from qat_jax import ops
from qat_jax.kernels import build, depthwise

# Float32 sums of kh*kw products (forward, input gradient) or of N*Ho*Wo products (kernel
# gradient) in another order than lax.conv's: ~1e-7 of the largest value observed; a wrong or
# missing tap moves a value by a whole product, ~1e-1 of it.
REL = 1e-5

# (N, H, W, C, kernel, stride, padding)
CASES = [
    (2, 7, 8, 5, (3, 3), (1, 1), 1),
    (2, 7, 8, 5, (3, 3), (2, 2), 1),
    (3, 9, 6, 17, (3, 3), (1, 2), 1),
    (1, 8, 8, 4, (5, 5), (2, 1), 2),
    (2, 6, 7, 3, (3, 3), (1, 1), 0),
    (2, 5, 5, 8, (1, 3), (1, 1), 0),
    (1, 4, 4, 2, (3, 3), (2, 2), 3),  # padding wider than the kernel: border outputs are 0
    # channel counts with a compile-time inner loop in the kernel (32-96) and 16 (run-time)
    (2, 6, 7, 32, (3, 3), (2, 2), 1),
    (1, 5, 6, 96, (3, 3), (1, 1), 1),
    (2, 6, 6, 16, (3, 3), (1, 1), 1),
]


def _xla_depthwise(x, k, strides, pad):
    return jax.lax.conv_general_dilated(
        x,
        k,
        strides,
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_depthwise_kernel_equals_lax_conv_in_value_and_gradient(rng, case):
    n, h, w, c, (kh, kw), strides, pad = case
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kw, 1, c)), jnp.float32)
    padding = ((pad, pad), (pad, pad))
    want = _xla_depthwise(x, k, strides, pad)
    got = jax.jit(lambda a, b: depthwise.depthwise_conv2d(a, b, strides, padding))(x, k)
    assert got.shape == want.shape
    assert_close_to_scale(got, want, REL, err_msg="forward")
    probe = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)

    def grads(f):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * probe), argnums=(0, 1)))(x, k)

    g_want = grads(lambda a, b: _xla_depthwise(a, b, strides, pad))
    g_got = grads(lambda a, b: depthwise.depthwise_conv2d(a, b, strides, padding))
    for got_, want_, name in zip(g_got, g_want, ("d input", "d kernel"), strict=True):
        assert got_.shape == want_.shape
        assert_close_to_scale(got_, want_, REL, err_msg=name)


def test_depthwise_kernel_under_vmap_and_pmap(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 6, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
    pad = ((1, 1), (1, 1))
    want = jnp.stack([_xla_depthwise(xi, k, (1, 1), 1) for xi in x])
    f = lambda a: depthwise.depthwise_conv2d(a, k, (1, 1), pad)  # noqa: E731
    assert_close_to_scale(jax.vmap(f)(x), want, REL, err_msg="vmap")
    assert jax.local_device_count() >= 2  # tests/conftest.py: 8 simulated CPU devices
    assert_close_to_scale(jax.pmap(f)(x), want, REL, err_msg="pmap")


def test_conv2d_routes_only_supported_convs_to_the_kernel(rng):
    """``cpu_ffi`` runs float32 depthwise convs (multiplier 1, symmetric padding) as one custom
    call each and leaves every other conv on the ``cpu`` path."""
    x = jnp.zeros((1, 6, 6, 4), jnp.float32)

    def custom_calls(kernel_shape, padding=None, groups=4, dtype=jnp.float32):
        k = jnp.zeros(kernel_shape, dtype)
        f = lambda a, b: ops.conv2d(a, b, (1, 1), padding, groups, "cpu_ffi")  # noqa: E731
        return str(jax.jit(f).lower(x.astype(dtype), k).as_text()).count("custom_call")

    assert custom_calls((3, 3, 1, 4)) == 1
    assert custom_calls((3, 3, 1, 8)) == 0  # channel multiplier 2
    assert custom_calls((3, 3, 4, 4), groups=1) == 0  # dense conv
    assert custom_calls((3, 3, 1, 4), padding=((1, 0), (1, 1))) == 0  # asymmetric padding
    assert custom_calls((3, 3, 1, 4), dtype=jnp.bfloat16) == 0
    assert not depthwise.supports((1, 6, 6, 4), (3, 3, 1, 4), np.float16, ((1, 1), (1, 1)), 4)
    with pytest.raises(ValueError, match="float32 x"):
        depthwise.depthwise_conv2d(x, jnp.zeros((3, 3, 1, 8)), (1, 1), ((1, 1), (1, 1)))


def test_model_with_the_kernel_equals_the_cpu_path(rng):
    """A MobileNetV2 (stride-1 and stride-2 depthwise convs) gives the same train-mode logits and
    parameter gradients with ``conv_impl='cpu_ffi'`` as with ``'cpu'``."""
    from qat_jax.models import MobileNetV2

    kw = dict(
        num_classes=10,
        width_mult=0.5,
        variant="cifar",
        last_channel=32,
        dropout_rate=0.0,
        inverted_residual_setting=((1, 8, 1, 1), (6, 16, 2, 2)),
    )
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 1)), jnp.float32)
    y = jnp.arange(4) % 10
    base = MobileNetV2(**kw, conv_impl="cpu")
    variables = base.init({"params": jax.random.PRNGKey(0)}, x, train=False)

    def loss_and_grads(model):
        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    ffi_model = MobileNetV2(**kw, conv_impl="cpu_ffi")
    hlo = jax.jit(lambda v: ffi_model.apply(v, x, train=False)).lower(variables).as_text()
    assert hlo.count("qat_jax_depthwise_forward") == 3  # one per block's depthwise conv
    g_cpu, logits_cpu = loss_and_grads(base)
    g_ffi, logits_ffi = loss_and_grads(ffi_model)
    assert_logits_match(logits_ffi, logits_cpu, REL)
    scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_cpu))
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(g_ffi)[0], jax.tree.leaves(g_cpu), strict=True
    ):
        assert_close_to_scale(a, b, 1e-4, scale=scale, err_msg=jax.tree_util.keystr(path))


def test_build_is_cached_per_machine_and_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    path = build.library_path("depthwise_cpu")
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert os.path.basename(path).startswith("depthwise_cpu-") and path.endswith(".so")
    mtime = os.stat(path).st_mtime_ns
    assert build.library_path("depthwise_cpu") == path  # found, not rebuilt
    assert os.stat(path).st_mtime_ns == mtime
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith(".")] == []  # no temp left

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.KernelUnavailable, match=r"no C\+\+ compiler") as e:
        build.library_path("depthwise_cpu")
    assert "\n" not in str(e.value)

    broken = tmp_path / "cxx"  # a "compiler" that fails like one
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\n"
                      "echo 'x.cc:1: error: it broke' >&2; exit 1\n")  # fmt: skip
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with pytest.raises(build.KernelUnavailable, match="error: it broke") as e:
        build.library_path("depthwise_cpu")
    assert "\n" not in str(e.value)
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith(".")] == []


def test_cache_dir_follows_the_environment(tmp_path):
    assert build.cache_dir({"QAT_JAX_KERNEL_CACHE": "/a/b"}) == "/a/b"
    assert build.cache_dir({"XDG_CACHE_HOME": "/x"}) == os.path.join("/x", "qat_jax", "kernels")
    home = build.cache_dir({})
    assert home.endswith(os.path.join(".cache", "qat_jax", "kernels"))


def test_cpu_ffi_is_a_cpu_impl():
    assert ops.resolve_impl("cpu_ffi") == "cpu_ffi"  # the tests run on the CPU backend
    with pytest.raises(ValueError, match="conv impl must be one of"):
        ops.resolve_impl("ffi")


def test_auto_uses_the_kernel_where_it_builds_and_falls_back_with_one_warning(monkeypatch):
    assert depthwise.available() and ops.resolve_impl("auto") == "cpu_ffi"

    def unavailable():
        raise build.KernelUnavailable("no C++ compiler: 'c++' is not on PATH (set $CXX)")

    depthwise.available.cache_clear()
    try:
        monkeypatch.setattr(depthwise, "ensure_loaded", unavailable)
        with pytest.warns(RuntimeWarning, match="shifted-tap path"):
            assert ops.resolve_impl("auto") == "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process, not once per conv
            assert ops.resolve_impl("auto") == "cpu"
    finally:
        depthwise.available.cache_clear()


def test_auto_builds_the_kernel_only_for_a_depthwise_conv(rng, monkeypatch):
    """'auto' on CPU asks for the kernel only when a conv it computes is met: a regular conv
    never builds (or warns about) it, a depthwise conv gives the kernel's result."""
    calls = []
    real = depthwise.available
    monkeypatch.setattr(depthwise, "available", lambda: calls.append(1) or real())
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.float32)
    np.testing.assert_array_equal(ops.conv2d(x, k, impl="auto"), ops.conv2d(x, k, impl="cpu"))
    assert calls == []
    kd = jnp.asarray(rng.standard_normal((3, 3, 1, 16)), jnp.float32)
    got = ops.conv2d(x, kd, feature_group_count=16, impl="auto")
    np.testing.assert_array_equal(got, ops.conv2d(x, kd, feature_group_count=16, impl="cpu_ffi"))
    assert calls == [1]
