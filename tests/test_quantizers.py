"""Sign quantizers: forward values (sign(0) = +1), closed-form backward passes, transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qat_jax.quantizers import approx_sign, rsign, sign, ste_sign, xnor_binarize

N_DEVICES = 8  # forced by tests/conftest.py


def _np_sign(x):
    """Reference sign with sign(0) = +1 (and sign(-0.0) = +1)."""
    return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def _edge_values():
    """Zeros of both signs, tiny values, clip/ApproxSign boundaries, large values."""
    return np.array(
        [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0, 1.0001, -1.0001, 3.0, -7.0, 1e4, -1e4],
        np.float32,
    )


def _vjp(f, *args, g):
    """(f(*args), VJP of g), jitted (eager custom_vjp backward passes compile op by op: slow)."""

    def run(a, gg):
        out, pull = jax.vjp(f, *a)
        return out, pull(gg)

    return jax.jit(run)(args, g)


# --------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("fn", [sign, ste_sign, approx_sign], ids=["sign", "ste", "approx"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_is_strict_pm1_with_sign0_plus1(fn, dtype):
    x = jnp.asarray(_edge_values(), dtype)
    y = fn(x)
    assert y.dtype == dtype
    y = np.asarray(y, np.float32)
    assert set(np.unique(y)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(y, _np_sign(np.asarray(x, np.float32)))
    # explicit zeros: +1, never 0
    assert float(fn(jnp.zeros((), dtype))) == 1.0
    assert float(fn(-jnp.zeros((), dtype))) == 1.0


def test_forward_random_matches_reference(rng):
    x = rng.standard_normal((5, 7, 3)).astype(np.float32)
    x[0, 0, 0] = 0.0
    for fn in (ste_sign, approx_sign, lambda z: ste_sign(z, None), lambda z: ste_sign(z, 0.1)):
        np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(x))), _np_sign(x))


def test_rsign_forward_threshold(rng):
    x = rng.standard_normal((4, 6, 5)).astype(np.float32)
    tau = rng.standard_normal(5).astype(np.float32)
    x[0, 0] = tau  # x == tau exactly -> sign(0) = +1
    for grad in ("approx", "ste"):
        y = np.asarray(rsign(jnp.asarray(x), jnp.asarray(tau), grad=grad))
        np.testing.assert_array_equal(y, _np_sign(x - tau))
        np.testing.assert_array_equal(y[0, 0], np.ones(5))
    with pytest.raises(ValueError):
        rsign(jnp.asarray(x), jnp.asarray(tau), grad="bogus")


@pytest.mark.parametrize(
    "shape,out_axis",
    [((3, 3, 4, 6), -1), ((10, 7), -1), ((7, 10), 0), ((2, 5, 3), 1)],
)
def test_xnor_forward(rng, shape, out_axis):
    w = rng.standard_normal(shape).astype(np.float32)
    ax = out_axis % len(shape)
    red = tuple(a for a in range(len(shape)) if a != ax)
    alpha = np.mean(np.abs(w), axis=red, keepdims=True)
    ref = alpha * _np_sign(w)
    got = np.asarray(xnor_binarize(jnp.asarray(w), out_axis=out_axis))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    # every output channel holds exactly two values +-alpha_o
    moved = np.moveaxis(got, ax, 0).reshape(shape[ax], -1)
    for o in range(shape[ax]):
        assert np.unique(np.abs(moved[o])).size == 1


# --------------------------------------------------------------------------- backward


def test_ste_backward_scalar_clip(rng):
    x = np.concatenate([_edge_values(), rng.uniform(-2, 2, 50).astype(np.float32)])
    g = rng.standard_normal(x.shape).astype(np.float32)
    for clip in (1.0, 0.5, 3.0):
        _, (dx,) = _vjp(lambda z, c=clip: ste_sign(z, c), jnp.asarray(x), g=jnp.asarray(g))
        np.testing.assert_array_equal(np.asarray(dx), g * (np.abs(x) <= clip))
    # the boundary |x| == clip passes the gradient
    _, (dx,) = _vjp(lambda z: ste_sign(z, 1.0), jnp.asarray([1.0, -1.0]), g=jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(dx), [1.0, 1.0])


def test_ste_backward_default_clip_is_one(rng):
    x = rng.uniform(-2, 2, 100).astype(np.float32)
    dx = jax.jit(jax.grad(lambda z: jnp.sum(ste_sign(z))))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(dx), (np.abs(x) <= 1.0).astype(np.float32))


def test_ste_backward_array_clip(rng):
    x = rng.uniform(-3, 3, (6, 8)).astype(np.float32)
    g = rng.standard_normal((6, 8)).astype(np.float32)
    # per-element clip
    clip = rng.uniform(0.1, 2.5, (6, 8)).astype(np.float32)
    _, (dx, dclip) = _vjp(ste_sign, jnp.asarray(x), jnp.asarray(clip), g=jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(dx), g * (np.abs(x) <= clip))
    np.testing.assert_array_equal(np.asarray(dclip), np.zeros_like(clip))  # clip gets no gradient
    # per-row clip, broadcast
    row = rng.uniform(0.1, 2.5, (6, 1)).astype(np.float32)
    _, (dx,) = _vjp(lambda z: ste_sign(z, jnp.asarray(row)), jnp.asarray(x), g=jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(dx), g * (np.abs(x) <= row))


def test_ste_backward_clip_none_is_identity(rng):
    x = np.concatenate([_edge_values(), rng.uniform(-50, 50, 30).astype(np.float32)])
    g = rng.standard_normal(x.shape).astype(np.float32)
    _, (dx,) = _vjp(lambda z: ste_sign(z, None), jnp.asarray(x), g=jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(dx), g)


def test_approx_sign_backward(rng):
    x = np.concatenate([_edge_values(), rng.uniform(-1.5, 1.5, 80).astype(np.float32)])
    g = rng.standard_normal(x.shape).astype(np.float32)
    _, (dx,) = _vjp(approx_sign, jnp.asarray(x), g=jnp.asarray(g))
    ref = g * np.maximum(0.0, 2.0 - 2.0 * np.abs(x.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-6, atol=1e-7)
    # peak 2 at 0, zero from |x| >= 1
    dx0 = jax.jit(jax.grad(lambda z: jnp.sum(approx_sign(z))))(jnp.asarray([0.0, 1.0, -1.0, 0.25]))
    np.testing.assert_allclose(np.asarray(dx0), [2.0, 0.0, 0.0, 1.5], rtol=1e-7)


def test_rsign_backward_approx(rng):
    x = rng.uniform(-2, 2, (4, 5, 6)).astype(np.float32)
    tau = rng.uniform(-0.5, 0.5, 6).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    _, (dx, dtau) = _vjp(rsign, jnp.asarray(x), jnp.asarray(tau), g=jnp.asarray(g))
    z = x.astype(np.float64) - tau
    ref_dx = g * np.maximum(0.0, 2.0 - 2.0 * np.abs(z))
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-5, atol=1e-6)
    # d/dtau = -d/dx, summed over the broadcast axes
    assert dtau.shape == tau.shape
    np.testing.assert_allclose(np.asarray(dtau), -ref_dx.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


def test_rsign_backward_ste(rng):
    x = rng.uniform(-2, 2, (8, 3)).astype(np.float32)
    tau = np.array([0.3, -0.2, 0.0], np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    f = lambda a, t: rsign(a, t, grad="ste", clip=0.5)
    _, (dx, dtau) = _vjp(f, jnp.asarray(x), jnp.asarray(tau), g=jnp.asarray(g))
    mask = np.abs(x - tau) <= 0.5
    np.testing.assert_allclose(np.asarray(dx), g * mask, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dtau), -(g * mask).sum(0), rtol=1e-5, atol=1e-6)


def _xnor_grad_by_hand(w, g, clip, out_axis=-1):
    """dL/dW of L = sum(g * alpha * ste_sign(W)), alpha = mean|W| over the non-output axes.

    = g * alpha * 1[|W| <= clip] + sign(W) / n * sum(g * sign(W)) (per output channel).
    """
    ax = out_axis % w.ndim
    red = tuple(a for a in range(w.ndim) if a != ax)
    n = np.prod([w.shape[a] for a in red])
    alpha = np.mean(np.abs(w), axis=red, keepdims=True)
    s = _np_sign(w)
    mask = np.ones_like(w) if clip is None else (np.abs(w) <= clip)
    return g * alpha * mask + s / n * np.sum(g * s, axis=red, keepdims=True)


@pytest.mark.parametrize("clip", [None, 0.5, 1.0])
@pytest.mark.parametrize("shape,out_axis", [((3, 3, 4, 5), -1), ((12, 6), -1), ((6, 12), 0)])
def test_xnor_backward_closed_form(rng, clip, shape, out_axis):
    w = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    f = lambda k: xnor_binarize(k, out_axis=out_axis, clip=clip)
    _, (dw,) = _vjp(f, jnp.asarray(w), g=jnp.asarray(g))
    ref = _xnor_grad_by_hand(w.astype(np.float64), g.astype(np.float64), clip, out_axis)
    np.testing.assert_allclose(np.asarray(dw), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- transformations


def test_jit_matches_eager(rng):
    x = jnp.asarray(rng.uniform(-2, 2, (5, 9)).astype(np.float32))
    tau = jnp.asarray(rng.uniform(-0.5, 0.5, 9).astype(np.float32))
    clip = jnp.asarray(rng.uniform(0.2, 2.0, (5, 1)).astype(np.float32))
    pairs = [
        (lambda z: ste_sign(z, clip), (x,)),
        (approx_sign, (x,)),
        (rsign, (x, tau)),
        (xnor_binarize, (x,)),
    ]
    for f, args in pairs:
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(*args)), np.asarray(f(*args)))
        loss = lambda *a, f=f: jnp.sum(f(*a) * jnp.arange(a[0].size).reshape(a[0].shape))
        ge = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
        gj = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
        for a, b in zip(ge, gj, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_vmap_per_row_clip_and_grad(rng):
    x = rng.uniform(-2, 2, (6, 10)).astype(np.float32)
    clip = rng.uniform(0.2, 2.0, 6).astype(np.float32)
    g = rng.standard_normal((6, 10)).astype(np.float32)
    y = jax.vmap(ste_sign)(jnp.asarray(x), jnp.asarray(clip))
    np.testing.assert_array_equal(np.asarray(y), _np_sign(x))
    row_grad = jax.grad(lambda z, c, gg: jnp.sum(gg * ste_sign(z, c)))
    dx = jax.jit(jax.vmap(row_grad))(jnp.asarray(x), jnp.asarray(clip), jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(dx), g * (np.abs(x) <= clip[:, None]))


def test_vmap_rsign_and_xnor(rng):
    x = rng.uniform(-2, 2, (4, 3, 5)).astype(np.float32)
    tau = rng.uniform(-0.5, 0.5, (4, 5)).astype(np.float32)
    dtau = jax.jit(jax.vmap(jax.grad(lambda z, t: jnp.sum(rsign(z, t)), argnums=1)))(
        jnp.asarray(x), jnp.asarray(tau)
    )
    ref = -np.maximum(0.0, 2.0 - 2.0 * np.abs(x - tau[:, None, :])).sum(axis=1)
    np.testing.assert_allclose(np.asarray(dtau), ref, rtol=1e-5, atol=1e-5)
    # a batch of kernels: vmap(xnor) equals per-kernel xnor
    w = rng.standard_normal((3, 6, 4)).astype(np.float32)
    got = jax.vmap(xnor_binarize)(jnp.asarray(w))
    for i in range(3):
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(xnor_binarize(w[i])), rtol=1e-7)


def test_second_order_grad_is_defined(rng):
    # grad of grad: the custom backward is piecewise constant in x for ste -> zero second derivative
    x = jnp.asarray(rng.uniform(-0.9, 0.9, 7).astype(np.float32))
    h = jax.jit(jax.grad(lambda z: jnp.sum(jax.grad(lambda u: jnp.sum(ste_sign(u)))(z) * z)))(x)
    np.testing.assert_allclose(np.asarray(h), np.ones(7), rtol=1e-7)


def test_pmap_eight_devices(rng):
    assert jax.device_count() == N_DEVICES, (
        "tests/conftest.py must force 8 host devices before jax initialises"
    )
    x = rng.uniform(-2, 2, (N_DEVICES, 4, 6)).astype(np.float32)
    tau = rng.uniform(-0.5, 0.5, (N_DEVICES, 6)).astype(np.float32)
    g = rng.standard_normal((N_DEVICES, 4, 6)).astype(np.float32)

    def per_device(z, t, gg):
        loss = lambda a, b: jnp.sum(gg * rsign(a, b)) + jnp.sum(gg * ste_sign(a, 0.5))
        y = rsign(z, t)
        dz, dt = jax.grad(loss, argnums=(0, 1))(z, t)
        dt_total = jax.lax.psum(dt, "dev")
        return y, dz, dt, dt_total

    y, dz, dt, dt_total = jax.pmap(per_device, axis_name="dev")(
        jnp.asarray(x), jnp.asarray(tau), jnp.asarray(g)
    )
    z = x - tau[:, None, :]
    approx = g * np.maximum(0.0, 2.0 - 2.0 * np.abs(z))
    np.testing.assert_array_equal(np.asarray(y), _np_sign(z))
    np.testing.assert_allclose(
        np.asarray(dz), approx + g * (np.abs(x) <= 0.5), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(dt), -approx.sum(1), rtol=1e-5, atol=1e-5)
    ref_total = np.broadcast_to(-approx.sum(axis=(0, 1)), (N_DEVICES, 6))
    np.testing.assert_allclose(np.asarray(dt_total), ref_total, rtol=1e-5, atol=1e-4)

    # xnor under pmap: one kernel per device
    w = rng.standard_normal((N_DEVICES, 3, 3, 2, 4)).astype(np.float32)
    gw = rng.standard_normal(w.shape).astype(np.float32)
    dw = jax.pmap(jax.grad(lambda k, gg: jnp.sum(gg * xnor_binarize(k))))(
        jnp.asarray(w), jnp.asarray(gw)
    )
    for i in range(N_DEVICES):
        ref = _xnor_grad_by_hand(w[i].astype(np.float64), gw[i].astype(np.float64), None)
        np.testing.assert_allclose(np.asarray(dw[i]), ref, rtol=1e-5, atol=1e-6)
