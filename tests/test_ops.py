"""Convolution primitives: every impl equals a numpy im2col reference; patches follow (kh, kw, c)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale

from qat_jax.ops import conv2d, extract_patches, resolve_impl, same_padding


def _np_patches(x, k, s):
    """[N, Ho, Wo, kh, kw, C] with symmetric k // 2 zero padding (float64)."""
    kh, kw = k
    n, h, w, c = x.shape
    ph, pw = kh // 2, kw // 2
    xp = np.zeros((n, h + 2 * ph, w + 2 * pw, c))
    xp[:, ph : ph + h, pw : pw + w] = x
    ho = (h + 2 * ph - kh) // s[0] + 1
    wo = (w + 2 * pw - kw) // s[1] + 1
    out = np.zeros((n, ho, wo, kh, kw, c))
    for y in range(ho):
        for xx in range(wo):
            out[:, y, xx] = xp[:, y * s[0] : y * s[0] + kh, xx * s[1] : xx * s[1] + kw]
    return out


def np_conv(x, kernel, strides, groups):
    """Grouped conv by im2col: per group, (kh, kw, c)-flattened patches @ kernel.reshape(d, dg)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    kh, kw, cin_g, cout = kernel.shape
    dg = cout // groups
    p = _np_patches(x, (kh, kw), strides)
    outs = []
    for g in range(groups):
        pg = p[..., g * cin_g : (g + 1) * cin_g].reshape(*p.shape[:3], kh * kw * cin_g)
        kg = kernel[..., g * dg : (g + 1) * dg].reshape(kh * kw * cin_g, dg)
        outs.append(pg @ kg)
    return np.concatenate(outs, axis=-1)


# (name, kernel, C_in, C_out, groups, H, W)
# Conv implementations (shifted taps, lax.conv, patches @ kernel) against a float64 im2col
# reference: float32 sums of up to 9*cin products in another order. 1e-5 of the output's largest
# magnitude is ~20x the observed rounding and far below one wrong tap (a whole product).
CONV_REL = 1e-5

CASES = [
    ("3x3", (3, 3), 3, 5, 1, 7, 7),
    ("3x3_even", (3, 3), 4, 6, 1, 8, 6),
    ("1x1", (1, 1), 6, 4, 1, 7, 8),
    ("depthwise", (3, 3), 5, 5, 5, 7, 8),
    ("depthwise_x2", (3, 3), 3, 6, 3, 6, 6),
    ("grouped", (3, 3), 4, 6, 2, 7, 6),
    ("5x5", (5, 5), 2, 3, 1, 9, 8),
    ("2x2_even_kernel", (2, 2), 2, 3, 1, 6, 5),
]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv2d_impls_match_im2col_reference(rng, case, stride):
    _, k, cin, cout, groups, h, w = case
    x = rng.standard_normal((2, h, w, cin)).astype(np.float32)
    kernel = rng.standard_normal((*k, cin // groups, cout)).astype(np.float32)
    ref = np_conv(x, kernel, (stride, stride), groups)
    outs = {}
    for impl in ("cpu", "xla", "auto", "cpu_ffi"):
        y = conv2d(
            jnp.asarray(x),
            jnp.asarray(kernel),
            (stride, stride),
            feature_group_count=groups,
            impl=impl,
            precision=jax.lax.Precision.HIGHEST,
        )
        assert y.shape == ref.shape, (impl, y.shape, ref.shape)
        assert_close_to_scale(y, ref, CONV_REL, err_msg=impl)
        outs[impl] = np.asarray(y)
    assert_close_to_scale(outs["cpu"], outs["xla"], CONV_REL, err_msg="cpu vs xla")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv2d_impls_have_the_same_gradients(rng, case, stride):
    """The CPU path's own VJPs (1x1 convs), autodiff of its taps and the compiled depthwise
    kernel's VJP (``cpu_ffi``) equal lax.conv's gradients."""
    _, k, cin, cout, groups, h, w = case
    x = jnp.asarray(rng.standard_normal((2, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((*k, cin // groups, cout)), jnp.float32)
    out_shape = jax.eval_shape(
        lambda a, b: conv2d(a, b, (stride, stride), None, groups, "xla"), x, kernel
    )
    probe = jnp.asarray(rng.standard_normal(out_shape.shape), jnp.float32)

    def loss(impl):
        def f(a, b):
            y = conv2d(
                a,
                b,
                (stride, stride),
                feature_group_count=groups,
                impl=impl,
                precision=jax.lax.Precision.HIGHEST,
            )
            return jnp.sum(y * probe)

        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, kernel)

    want = loss("xla")
    for impl in ("cpu", "cpu_ffi"):
        for got, ref, name in zip(loss(impl), want, ("d input", "d kernel"), strict=True):
            assert got.shape == ref.shape
            assert_close_to_scale(got, ref, CONV_REL, err_msg=f"{impl} {name}")


def test_conv2d_explicit_padding_and_asymmetric_strides(rng):
    x = rng.standard_normal((1, 7, 9, 3)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    # zero padding: a valid conv equals the symmetric conv's interior
    for impl in ("cpu", "xla", "cpu_ffi"):
        valid = conv2d(jnp.asarray(x), jnp.asarray(kernel), padding=((0, 0), (0, 0)), impl=impl)
        full = np_conv(x, kernel, (1, 1), 1)
        assert_close_to_scale(valid, full[:, 1:-1, 1:-1], CONV_REL, err_msg=impl)
        y = conv2d(jnp.asarray(x), jnp.asarray(kernel), (1, 2), impl=impl)
        assert_close_to_scale(y, np_conv(x, kernel, (1, 2), 1), CONV_REL, err_msg=impl)


def test_resolve_impl():
    # tests/test_kernels.py: 'auto' falls back to 'cpu' where the kernels do not build
    assert resolve_impl("auto") == ("cpu_ffi" if jax.default_backend() == "cpu" else "xla")
    assert resolve_impl("xla") == "xla" and resolve_impl("cpu") == "cpu"
    with pytest.raises(ValueError):
        resolve_impl("cuda")
    assert same_padding((3, 1, 5)) == ((1, 1), (0, 0), (2, 2))


@pytest.mark.parametrize("k,stride", [((3, 3), 1), ((3, 3), 2), ((1, 1), 2), ((5, 3), 1)])
def test_extract_patches_order_and_matmul_equals_conv(rng, k, stride):
    n, h, w, cin, cout = 2, 7, 6, 3, 4
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    kernel = rng.standard_normal((*k, cin, cout)).astype(np.float32)
    p = np.asarray(extract_patches(jnp.asarray(x), k, (stride, stride)))
    ref_p = _np_patches(x, k, (stride, stride))
    assert p.shape == (*ref_p.shape[:3], k[0] * k[1], cin)
    np.testing.assert_array_equal(p, ref_p.reshape(p.shape))
    flat = p.reshape(*p.shape[:3], -1)  # (kh, kw, c) order, c fastest
    y_mat = flat.astype(np.float64) @ kernel.reshape(-1, cout)
    y = conv2d(jnp.asarray(x), jnp.asarray(kernel), (stride, stride), impl="xla")
    assert_close_to_scale(y, y_mat, CONV_REL)
    # patch index d = (i * kw + j) * C + c
    i, j, c = k[0] - 1, 0, cin - 1
    np.testing.assert_array_equal(flat[..., (i * k[1] + j) * cin + c], ref_p[..., i, j, c])
