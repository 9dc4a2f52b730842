"""Importance-aware binarization: closed forms, least-squares alpha, output error, refinement, STE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qat_jax.binarize import fit_alpha, importance_binarize, output_error, refine, xnor_matrix

# jitted entry points: eager dispatch compiles op by op (seconds on 2 CPU cores)
ib = jax.jit(importance_binarize, static_argnames=("clip", "refine_sweeps"))
refine_j = jax.jit(refine, static_argnames=("sweeps",))
output_error_j = jax.jit(output_error)


def _np_sign(x):
    return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def _quad(a, c, b):
    """Row-wise a C b^T in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.einsum("...oi,...ij,...oj->...o", a, np.asarray(c, np.float64), b)


def _row_error(w, b, alpha, c):
    """Per-row (w - alpha b) C (w - alpha b)^T in float64 (alpha may carry extra leading axes)."""
    w, b, c = (np.asarray(t, np.float64) for t in (w, b, c))
    alpha = np.asarray(alpha, np.float64)
    diff = w - alpha[..., None] * b
    return np.einsum("...oi,ij,...oj->...o", diff, c, diff)


@pytest.fixture(scope="module")
def correlated():
    """d_in 64, d_out 32; inputs = low rank (8) plus noise; C = E[x x^T] from the samples."""
    rng = np.random.default_rng(1)
    n, d_in, d_out, rank = 2048, 64, 32, 8
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d_in))
    x = (x + 0.3 * rng.standard_normal((n, d_in))).astype(np.float32)
    c = (x.astype(np.float64).T @ x / n).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    return w, x, c


def _sample_error(w, w_hat, x):
    """E||(W - W_hat) x||^2 / E||W x||^2 measured on the samples (float64)."""
    w, w_hat, x = (np.asarray(t, np.float64) for t in (w, w_hat, x))
    num = np.mean(np.sum(((w - w_hat) @ x.T) ** 2, axis=0))
    den = np.mean(np.sum((w @ x.T) ** 2, axis=0))
    return num / den


# --------------------------------------------------------------------------- closed forms


def test_diagonal_c_gives_sign_w_and_weighted_alpha(rng):
    w = rng.standard_normal((7, 11)).astype(np.float32)
    cdiag = rng.uniform(0.1, 3.0, 11).astype(np.float32)
    b, alpha = ib(jnp.asarray(w), jnp.asarray(np.diag(cdiag)))
    np.testing.assert_array_equal(np.asarray(b), _np_sign(w))
    ref = (np.abs(w) * cdiag).sum(1) / cdiag.sum()
    np.testing.assert_allclose(np.asarray(alpha), ref, rtol=1e-5)


def test_identity_and_none_give_xnor(rng):
    w = rng.standard_normal((2, 5, 9)).astype(np.float32)
    ref_alpha = np.abs(w).mean(-1)
    for c in (None, jnp.eye(9), jnp.broadcast_to(jnp.eye(9), (2, 9, 9))):
        b, alpha = ib(jnp.asarray(w), c)
        np.testing.assert_array_equal(np.asarray(b), _np_sign(w))
        np.testing.assert_allclose(np.asarray(alpha), ref_alpha, rtol=1e-6)
    b, alpha = xnor_matrix(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(b), _np_sign(w))
    np.testing.assert_allclose(np.asarray(alpha), ref_alpha, rtol=1e-6)


def test_pattern_is_sign_wc_and_alpha_closed_form(rng):
    w = rng.standard_normal((6, 10)).astype(np.float32)
    m = rng.standard_normal((10, 10))
    c = (m @ m.T / 10 + 0.1 * np.eye(10)).astype(np.float32)
    b, alpha = ib(jnp.asarray(w), jnp.asarray(c))
    u = w.astype(np.float64) @ c
    np.testing.assert_array_equal(np.asarray(b), _np_sign(u))
    bb = np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(alpha), _quad(w, c, bb) / _quad(bb, c, bb), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(fit_alpha(jnp.asarray(w), b, jnp.asarray(c))), np.asarray(alpha), rtol=1e-6
    )


def test_batched_leading_axes_match_per_slice(rng):
    w = rng.standard_normal((3, 4, 9)).astype(np.float32)
    m = rng.standard_normal((3, 9, 9))
    c = (m @ np.swapaxes(m, -1, -2) / 9).astype(np.float32)
    b, alpha = ib(jnp.asarray(w), jnp.asarray(c), refine_sweeps=2)
    for g in range(3):
        bg, ag = ib(jnp.asarray(w[g]), jnp.asarray(c[g]), refine_sweeps=2)
        np.testing.assert_array_equal(np.asarray(b[g]), np.asarray(bg))
        np.testing.assert_allclose(np.asarray(alpha[g]), np.asarray(ag), rtol=1e-5)


def test_output_error_formula(rng):
    w = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w_hat = rng.standard_normal((2, 5, 8)).astype(np.float32)
    m = rng.standard_normal((8, 8))
    c = (m @ m.T).astype(np.float32)
    got = np.asarray(output_error_j(jnp.asarray(w), jnp.asarray(w_hat), jnp.asarray(c)))
    d = (w - w_hat).astype(np.float64)
    ref = np.array(
        [
            np.trace(d[i] @ c @ d[i].T) / np.trace(w[i] @ c.astype(np.float64) @ w[i].T)
            for i in (0, 1)
        ]
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    got_i = np.asarray(output_error_j(jnp.asarray(w), jnp.asarray(w_hat)))
    ref_i = np.sum(d**2, axis=(1, 2)) / np.sum(w.astype(np.float64) ** 2, axis=(1, 2))
    np.testing.assert_allclose(got_i, ref_i, rtol=1e-5)


# --------------------------------------------------------------------------- correlated inputs


def test_importance_beats_xnor_on_correlated_inputs(correlated):
    w, x, c = correlated
    xnor_hat = np.abs(w).mean(1, keepdims=True) * _np_sign(w)
    e_xnor = _sample_error(w, xnor_hat, x)
    b, alpha = ib(jnp.asarray(w), jnp.asarray(c))
    imp_hat = np.asarray(alpha)[:, None] * np.asarray(b)
    e_imp = _sample_error(w, imp_hat, x)
    print(f"relative output error: xnor {e_xnor:.4f}, importance {e_imp:.4f}")
    assert e_imp < 0.5 * e_xnor, (e_imp, e_xnor)
    # output_error_j(C = sample second moment) is the same quantity
    for w_hat, e in ((xnor_hat, e_xnor), (imp_hat, e_imp)):
        got = float(output_error_j(jnp.asarray(w), jnp.asarray(w_hat, jnp.float32), jnp.asarray(c)))
        np.testing.assert_allclose(got, e, rtol=1e-4)
    # the library's xnor path (C = None) is the XNOR binarizer measured above
    bx, ax = xnor_matrix(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(ax)[:, None] * np.asarray(bx), xnor_hat, rtol=1e-6)


def test_refine_sweeps_never_increase_error(correlated):
    w, x, c = correlated
    errs, errs_c = [], []
    for k in range(6):
        b, alpha = ib(jnp.asarray(w), jnp.asarray(c), refine_sweeps=k)
        b = np.asarray(b)
        assert set(np.unique(b)) <= {-1.0, 1.0}
        w_hat = np.asarray(alpha)[:, None] * b
        errs.append(_sample_error(w, w_hat, x))
        # per-row errors are monotone too (rows are refined independently)
        errs_c.append(_row_error(w, b, np.asarray(alpha), c))
    print("relative output error by refine sweeps 0..5:", [f"{e:.4f}" for e in errs])
    for k in range(1, 6):
        assert errs[k] <= errs[k - 1] * (1 + 1e-5), (k, errs)
        assert np.all(errs_c[k] <= errs_c[k - 1] * (1 + 1e-5) + 1e-6), k
    assert errs[1] < errs[0]  # refinement actually helps here


def test_refine_reaches_single_flip_local_optimum(rng):
    """After enough sweeps no single flip (alpha refit) lowers a row's error."""
    d_out, d_in = 4, 12
    x = rng.standard_normal((500, 3)) @ rng.standard_normal((3, d_in)) + 0.2 * rng.standard_normal(
        (500, d_in)
    )
    c = (x.T @ x / 500).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    b0 = _np_sign(w @ c).astype(np.float32)
    b = np.asarray(refine_j(jnp.asarray(w), jnp.asarray(b0), jnp.asarray(c), sweeps=30), np.float64)

    def best_err(bm):  # error with alpha refit: w C w^T - (w C b^T)^2 / (b C b^T)
        return _quad(w, c, w) - _quad(w, c, bm) ** 2 / _quad(bm, c, bm)

    base = best_err(b)
    for i in range(d_in):
        flipped = b.copy()
        flipped[:, i] *= -1
        assert np.all(best_err(flipped) >= base - 1e-6 * np.abs(base).max()), i
    assert np.all(base <= best_err(b0) + 1e-9)
    # c = None: sign(W) is already optimal, returned unchanged
    np.testing.assert_array_equal(np.asarray(refine_j(jnp.asarray(w), jnp.asarray(b0), None)), b0)


def test_alpha_is_least_squares_optimum(correlated):
    w, _, c = correlated
    b, alpha = ib(jnp.asarray(w), jnp.asarray(c))
    b, alpha = np.asarray(b, np.float64), np.asarray(alpha, np.float64)
    # dense grid around alpha: numerical 1-D minimisation of the error for fixed B
    grid = alpha[None, :] * (1.0 + np.linspace(-0.5, 0.5, 2001))[:, None]  # [2001, d_out]
    errs = _row_error(w[None], b[None], grid, c)  # [2001, d_out]
    a_grid = grid[np.argmin(errs, axis=0), np.arange(w.shape[0])]
    step = alpha * (1.0 / 2000)
    np.testing.assert_array_less(np.abs(a_grid - alpha), 1.01 * step)
    # Newton's method from a different start on the 1-D error e(a) with numerical derivatives
    a = 0.5 * alpha
    h = 1e-3 * np.abs(alpha)
    for _ in range(3):
        e0 = _row_error(w, b, a, c)
        ep = _row_error(w, b, a + h, c)
        em = _row_error(w, b, a - h, c)
        a = a - ((ep - em) / (2 * h)) / ((ep - 2 * e0 + em) / h**2)
    np.testing.assert_allclose(alpha, a, rtol=1e-4)
    # and the optimum is no worse than XNOR's mean|W| for the same pattern
    assert np.all(_row_error(w, b, alpha, c) <= _row_error(w, b, np.abs(w).mean(1), c) + 1e-9)


# --------------------------------------------------------------------------- gradients


def test_gradient_reaches_w_and_c(correlated, rng):
    w, _, c = correlated
    g = rng.standard_normal(w.shape).astype(np.float32)

    def loss(wv, cv):
        b, alpha = ib(wv, cv)
        return jnp.sum(jnp.asarray(g) * alpha[:, None] * b)

    gw, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(w), jnp.asarray(c))
    for grad in (gw, gc):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad))
        assert np.max(np.abs(grad)) > 1e-3
        assert np.mean(grad != 0) > 0.5


@pytest.mark.parametrize("clip", [0.5, 1.0, 1.5])
def test_relative_clip_zeroes_exactly_outliers(rng, clip):
    w = rng.standard_normal((16, 40)).astype(np.float32)
    w[:, 0] *= 5.0  # a few outliers per row
    g = rng.uniform(0.5, 1.5, w.shape).astype(np.float32)  # never zero
    loss = lambda wv: jnp.sum(jnp.asarray(g) * ib(wv, None, clip=clip)[0])
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(w)))
    rms = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=1, keepdims=True))
    outside = np.abs(w) > clip * rms
    np.testing.assert_array_equal(grad == 0, outside)
    assert np.mean(grad == 0) == pytest.approx(np.mean(outside))
    assert 0 < np.mean(outside) < 1
    np.testing.assert_allclose(grad, np.where(outside, 0.0, g), rtol=1e-6)


def test_relative_clip_through_c(rng):
    """With C, the clip acts on U = W C and dL/dW = (G * 1[|U| <= clip rms(U_row)]) C^T."""
    w = rng.standard_normal((8, 12)).astype(np.float32)
    m = rng.standard_normal((12, 12))
    c = (m @ m.T / 12 + 0.2 * np.eye(12)).astype(np.float32)
    g = rng.standard_normal(w.shape).astype(np.float32)
    clip = 1.0
    loss = lambda wv, cv: jnp.sum(jnp.asarray(g) * ib(wv, cv, clip=clip)[0])
    gw, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(w), jnp.asarray(c))
    u = w.astype(np.float64) @ c
    mask = np.abs(u) <= clip * np.sqrt(np.mean(u**2, axis=1, keepdims=True))
    assert 0 < mask.mean() < 1
    gu = g * mask
    np.testing.assert_allclose(np.asarray(gw), gu @ c.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gc), w.astype(np.float64).T @ gu, rtol=1e-4, atol=1e-5)


def test_clip_none_passes_everything(rng):
    w = rng.standard_normal((4, 30)).astype(np.float32)
    w[:, :3] *= 100.0
    g = rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
    loss = lambda wv: jnp.sum(jnp.asarray(g) * ib(wv, None, clip=None)[0])
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(jnp.asarray(w))), g, rtol=1e-6)


def test_refined_pattern_keeps_straight_through_gradient(correlated, rng):
    w, _, c = correlated
    g = rng.standard_normal(w.shape).astype(np.float32)
    loss = lambda wv, k: jnp.sum(jnp.asarray(g) * ib(wv, jnp.asarray(c), refine_sweeps=k)[0])
    g0 = np.asarray(jax.grad(loss)(jnp.asarray(w), 0))
    g2 = np.asarray(jax.grad(loss)(jnp.asarray(w), 2))
    assert np.all(np.isfinite(g2))
    # the flips carry no gradient: the STE gradient of the pattern is unchanged
    np.testing.assert_allclose(g2, g0, rtol=1e-5, atol=1e-6)
