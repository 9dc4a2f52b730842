"""The orthonormal transform: Cayley map, PCA calibration, importance init and correlation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qat_jax.transform import (
    cayley,
    correlation,
    importance,
    init_rho,
    orthonormality_error,
    pca_init,
    trained_basis,
)

# jitted entry points: eager linalg ops compile one by one (seconds on 2 CPU cores)
cayley_j = jax.jit(cayley)
pca_init_j = jax.jit(pca_init)
init_rho_j = jax.jit(init_rho, static_argnames=("gamma",))
correlation_j = jax.jit(correlation, static_argnames=("normalize",))
trained_basis_j = jax.jit(trained_basis)
orth_err_j = jax.jit(orthonormality_error)


def _np_cayley(p):
    """(I - A)(I + A)^-1 with A = P - P^T, in float64."""
    p = np.asarray(p, np.float64)
    a = p - np.swapaxes(p, -1, -2)
    eye = np.eye(p.shape[-1])
    return (eye - a) @ np.linalg.inv(eye + a)


def _orth_err(v):
    v = np.asarray(v, np.float64)
    return np.max(np.abs(np.swapaxes(v, -1, -2) @ v - np.eye(v.shape[-1])))


def _random_orthonormal(rng, d, batch=()):
    q, _ = np.linalg.qr(rng.standard_normal((*batch, d, d)))
    return q.astype(np.float32)


# --------------------------------------------------------------------------- cayley


@pytest.mark.parametrize("d", [1, 2, 3, 9, 64, 256, 960])
def test_cayley_orthonormal(d):
    p = jax.random.normal(jax.random.PRNGKey(d), (d, d), jnp.float32) / np.sqrt(d)
    q = cayley(p)  # eager: jit(cayley) crashes XLA:CPU at d ~ 900-1024, see test below
    assert q.shape == (d, d) and q.dtype == jnp.float32
    assert _orth_err(q) < 1e-5
    assert float(orth_err_j(q)) < 1e-5
    # Q Q^T = I as well (square orthonormal)
    qn = np.asarray(q, np.float64)
    assert np.max(np.abs(qn @ qn.T - np.eye(d))) < 1e-5
    if d <= 64:
        np.testing.assert_allclose(np.asarray(q), _np_cayley(p), atol=2e-5)


@pytest.mark.parametrize("d,scale", [(2, 3.0), (9, 1.0), (64, 1.0)])
def test_cayley_orthonormal_large_p(d, scale):
    p = scale * jax.random.normal(jax.random.PRNGKey(100 + d), (d, d), jnp.float32)
    q = cayley(p)
    assert _orth_err(q) < 1e-5
    np.testing.assert_allclose(np.asarray(q), _np_cayley(p), atol=1e-5)


_JIT_CAYLEY_960 = """
import resource
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core dump
import jax, jax.numpy as jnp
from qat_jax.transform import cayley, orthonormality_error
p = jax.random.normal(jax.random.PRNGKey(0), (1, 960, 960), jnp.float32) / 960**0.5
print(float(orthonormality_error(jax.jit(cayley)(p))))
"""


@pytest.mark.slow
def test_cayley_jit_d960_runs():
    """Guards the workaround in ``qat_jax.transform.cayley``: XLA:CPU (jax 0.10.2) segfaulted on
    the jitted ``jnp.eye(d) + P - P.T`` for d in ~[896, 1024] (d = 960 is MobileNetV2's widest
    1x1 conv input, and the train step is jitted). Run in a subprocess so that a crash cannot take
    the test session down; no ``preexec_fn``, which would fork the multithreaded JAX process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    res = subprocess.run(
        [sys.executable, "-c", _JIT_CAYLEY_960],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, f"jit(cayley) at d=960 crashed: rc={res.returncode}"
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5


def test_cayley_batched():
    p = jax.random.normal(jax.random.PRNGKey(1), (16, 9, 9), jnp.float32)
    q = cayley_j(p)
    assert q.shape == (16, 9, 9)
    assert _orth_err(q) < 1e-5
    assert float(orth_err_j(q)) < 1e-5
    np.testing.assert_allclose(np.asarray(q), _np_cayley(p), atol=1e-5)
    # each batch entry is its own transform
    for i in (0, 7, 15):
        np.testing.assert_allclose(np.asarray(q[i]), np.asarray(cayley(p[i])), atol=1e-6)  # eager


def test_cayley_identity_at_zero_and_symmetric_part_ignored(rng):
    np.testing.assert_array_equal(np.asarray(cayley_j(jnp.zeros((9, 9)))), np.eye(9))
    # only A = P - P^T matters: adding a symmetric matrix does not change Q
    p = rng.standard_normal((9, 9)).astype(np.float32)
    s = rng.standard_normal((9, 9)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(cayley_j(jnp.asarray(p + s + s.T))),
        np.asarray(cayley_j(jnp.asarray(p))),
        atol=1e-5,
    )
    with pytest.raises(ValueError):
        cayley_j(jnp.zeros((3, 4)))


def test_trained_basis_is_v0_at_p0(rng):
    v0 = _random_orthonormal(rng, 9, (16,))
    v = trained_basis_j(jnp.asarray(v0), jnp.zeros((16, 9, 9), jnp.float32))
    np.testing.assert_allclose(np.asarray(v), v0, atol=1e-7)
    p = 0.3 * rng.standard_normal((16, 9, 9)).astype(np.float32)
    v = trained_basis_j(jnp.asarray(v0), jnp.asarray(p))
    assert _orth_err(v) < 1e-5
    np.testing.assert_allclose(np.asarray(v), v0.astype(np.float64) @ _np_cayley(p), atol=1e-5)


def test_cayley_gradient_finite_differences(rng):
    d = 5
    p0 = 0.4 * rng.standard_normal((d, d))
    w = rng.standard_normal((d, d))
    with jax.enable_x64(True):
        f = jax.jit(lambda p: jnp.sum(jnp.asarray(w) * cayley(p)))
        g = np.asarray(jax.grad(f)(jnp.asarray(p0, jnp.float64)))
        assert g.dtype == np.float64
        eps = 1e-6
        fd = np.zeros_like(p0)
        for i in range(d):
            for j in range(d):
                e = np.zeros_like(p0)
                e[i, j] = eps
                fd[i, j] = (float(f(jnp.asarray(p0 + e))) - float(f(jnp.asarray(p0 - e)))) / (
                    2 * eps
                )
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    # the gradient is non-trivial and skew (only A = P - P^T matters)
    assert np.max(np.abs(g)) > 1e-2
    np.testing.assert_allclose(g, -g.T, atol=1e-10)


def test_correlation_gradient_finite_differences(rng):
    """d/d(P, rho) of a scalar of C = V0 cayley(P) diag(s^2) (...)^T, float64 central differences."""
    d = 4
    v0 = _random_orthonormal(rng, d).astype(np.float64)
    p0 = 0.3 * rng.standard_normal((d, d))
    rho0 = 0.5 * rng.standard_normal(d)
    w = rng.standard_normal((3, d))
    with jax.enable_x64(True):

        @jax.jit
        def f(p, rho):
            c = correlation(trained_basis(jnp.asarray(v0), p), rho)
            return jnp.sum((jnp.asarray(w) @ c) ** 2)

        gp, gr = jax.grad(f, argnums=(0, 1))(jnp.asarray(p0), jnp.asarray(rho0))
        eps = 1e-6

        def fd(x0, which):
            out = np.zeros_like(x0)
            for idx in np.ndindex(x0.shape):
                e = np.zeros_like(x0)
                e[idx] = eps
                args_p = [jnp.asarray(p0), jnp.asarray(rho0)]
                args_m = [jnp.asarray(p0), jnp.asarray(rho0)]
                args_p[which] = jnp.asarray(x0 + e)
                args_m[which] = jnp.asarray(x0 - e)
                out[idx] = (float(f(*args_p)) - float(f(*args_m))) / (2 * eps)
            return out

        fd_p, fd_r = fd(p0, 0), fd(rho0, 1)
    np.testing.assert_allclose(np.asarray(gp), fd_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gr), fd_r, rtol=1e-5, atol=1e-7)
    assert np.max(np.abs(fd_p)) > 1e-3 and np.max(np.abs(fd_r)) > 1e-3


# --------------------------------------------------------------------------- pca_init


def _low_rank_moment(rng, n, d, rank, batch=()):
    z = rng.standard_normal((*batch, n, rank))
    m = rng.standard_normal((*batch, rank, d))
    x = z @ m
    return (np.swapaxes(x, -1, -2) @ x / n).astype(np.float32)


def _pca_host(sigma):
    """The trainer's calibration path: numpy float64 on the host (no XLA program)."""
    v0, lam = pca_init(np.asarray(sigma, np.float64))
    assert isinstance(v0, np.ndarray) and v0.dtype == np.float64 and lam.dtype == np.float64
    return v0, lam


PCA_PATHS = pytest.mark.parametrize(
    "pca", [lambda s: pca_init_j(jnp.asarray(s)), _pca_host], ids=["jit", "numpy"]
)


@PCA_PATHS
def test_pca_init_rank_deficient(rng, pca):
    d, rank = 12, 3
    sigma = _low_rank_moment(rng, 200, d, rank)
    v0, lam = pca(sigma)
    v0, lam = np.asarray(v0), np.asarray(lam)
    assert v0.shape == (d, d) and lam.shape == (d,)
    assert np.all(np.isfinite(v0)) and np.all(np.isfinite(lam))
    assert _orth_err(v0) < 1e-5
    assert np.all(lam >= 0)
    assert np.all(np.diff(lam) <= 0), lam
    # the top eigenpairs are those of Sigma; the null space eigenvalues are ~0
    ref = np.sort(np.linalg.eigvalsh(sigma.astype(np.float64)))[::-1]
    np.testing.assert_allclose(lam[:rank], ref[:rank], rtol=1e-4)
    assert np.all(lam[rank:] <= 1e-4 * lam[0])
    np.testing.assert_allclose(sigma @ v0[:, :rank], v0[:, :rank] * lam[:rank], atol=1e-4 * lam[0])
    # reconstruction
    np.testing.assert_allclose((v0 * lam) @ v0.T, sigma, atol=1e-4 * lam[0])


@PCA_PATHS
def test_pca_init_zero_and_batched(rng, pca):
    v0, lam = pca(np.zeros((2, 5, 5), np.float32))
    assert np.all(np.isfinite(np.asarray(v0))) and np.all(np.asarray(lam) == 0)
    assert _orth_err(v0) < 1e-6
    # batched: one decomposition per leading entry, rank 1 (binary input style)
    sigma = _low_rank_moment(rng, 50, 9, 1, (4,))
    v0, lam = pca(sigma)
    v0, lam = np.asarray(v0), np.asarray(lam)
    assert v0.shape == (4, 9, 9) and lam.shape == (4, 9)
    assert _orth_err(v0) < 1e-5
    assert np.all(lam >= 0) and np.all(np.isfinite(lam)) and np.all(np.diff(lam, axis=-1) <= 0)
    for i in range(4):
        np.testing.assert_allclose(lam[i, 0], np.trace(sigma[i]), rtol=1e-4)
        np.testing.assert_allclose((v0[i] * lam[i]) @ v0[i].T, sigma[i], atol=1e-4 * lam[i, 0])


@PCA_PATHS
def test_pca_init_negative_rounding_clamped(pca):
    # a PSD matrix with a slightly negative eigenvalue from rounding
    sigma = np.diag([4.0, 1.0, -1e-7]).astype(np.float32)
    _, lam = pca(sigma)
    lam = np.asarray(lam)
    np.testing.assert_allclose(lam[:2], [4.0, 1.0], rtol=1e-6)
    assert 0 <= lam[2] <= 1e-5


# --------------------------------------------------------------------------- importance / C


def _unit_trace(m):
    """m / mean(eig m) = m * d / trace(m)."""
    m = np.asarray(m, np.float64)
    return m * m.shape[-1] / np.trace(m, axis1=-2, axis2=-1)[..., None, None]


def test_init_rho_gamma1_gives_sigma_up_to_scale(rng):
    d = 10
    x = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) + 0.1
    sigma = (x.T @ x / 400).astype(np.float32)
    v0, lam = pca_init_j(jnp.asarray(sigma))
    c = correlation_j(v0, init_rho_j(lam, 1.0))
    # normalised to mean eigenvalue 1
    np.testing.assert_allclose(np.trace(np.asarray(c, np.float64)), d, rtol=1e-5)
    np.testing.assert_allclose(_unit_trace(c), _unit_trace(sigma), atol=1e-4)
    # without normalisation the ratio is also preserved
    c_raw = correlation_j(v0, init_rho_j(lam, 1.0), normalize=False)
    np.testing.assert_allclose(_unit_trace(c_raw), _unit_trace(sigma), atol=1e-4)


def test_init_rho_gamma1_rank_deficient(rng):
    sigma = _low_rank_moment(rng, 100, 8, 2)
    v0, lam = pca_init_j(jnp.asarray(sigma))
    c = correlation_j(v0, init_rho_j(lam, 1.0))
    assert np.all(np.isfinite(np.asarray(c)))
    np.testing.assert_allclose(_unit_trace(c), _unit_trace(sigma), atol=1e-4)


def test_init_rho_gamma0_gives_identity(rng):
    sigma = _low_rank_moment(rng, 100, 7, 3, (2,))
    v0, lam = pca_init_j(jnp.asarray(sigma))
    rho = init_rho_j(lam, 0.0)
    np.testing.assert_array_equal(np.asarray(rho), np.zeros((2, 7)))
    np.testing.assert_allclose(
        np.asarray(correlation_j(v0, rho)), np.broadcast_to(np.eye(7), (2, 7, 7)), atol=1e-5
    )


def test_init_rho_tempered(rng):
    d = 6
    x = rng.standard_normal((300, d)) * np.linspace(0.2, 3.0, d)
    sigma = (x.T @ x / 300).astype(np.float32)
    v0, lam = pca_init_j(jnp.asarray(sigma))
    gamma = 0.25
    s2 = np.asarray(importance(init_rho_j(lam, gamma)), np.float64) ** 2
    lam64 = np.asarray(lam, np.float64)
    np.testing.assert_allclose(s2, (lam64 / lam64.mean()) ** gamma, rtol=1e-5)
    c = np.asarray(correlation_j(v0, init_rho_j(lam, gamma)), np.float64)
    v = np.asarray(v0, np.float64)
    ref = (v * (lam64**gamma / np.mean(lam64**gamma))) @ v.T
    np.testing.assert_allclose(c, ref, atol=1e-5)


def test_init_rho_numpy_matches_jit(rng):
    # the host path (numpy float64) computes the same importances as the jitted one
    lam = np.abs(rng.standard_normal((3, 7))) ** 3
    lam[1, 4:] = 0.0  # rank deficient
    lam[2] = 0.0  # all zero: rho = 0
    for gamma in (0.0, 0.5, 1.0):
        host = init_rho(lam.astype(np.float64), gamma)
        assert isinstance(host, np.ndarray)
        np.testing.assert_allclose(
            host, np.asarray(init_rho_j(jnp.asarray(lam, jnp.float32), gamma)), rtol=1e-5, atol=1e-5
        )
    assert np.all(init_rho(lam, 1.0)[2] == 0.0)


def test_init_rho_zero_eigenvalues_finite():
    rho = np.asarray(init_rho_j(jnp.zeros((3, 4)), 1.0))
    np.testing.assert_array_equal(rho, np.zeros((3, 4)))
    rho = np.asarray(init_rho_j(jnp.asarray([2.0, 1.0, 0.0, 0.0]), 1.0))
    assert np.all(np.isfinite(rho))


def test_correlation_closed_form(rng):
    v = _random_orthonormal(rng, 5, (3,))
    rho = rng.standard_normal((3, 5)).astype(np.float32)
    c = np.asarray(correlation_j(jnp.asarray(v), jnp.asarray(rho)), np.float64)
    s2 = np.exp(2.0 * rho.astype(np.float64))
    s2n = s2 / s2.mean(-1, keepdims=True)
    ref = np.einsum("bij,bj,bkj->bik", v.astype(np.float64), s2n, v.astype(np.float64))
    np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, np.swapaxes(c, -1, -2), atol=1e-6)
    np.testing.assert_allclose(np.trace(c, axis1=-2, axis2=-1), [5.0] * 3, rtol=1e-5)
    assert np.all(np.linalg.eigvalsh(c) > 0)
    np.testing.assert_allclose(np.asarray(importance(jnp.asarray(rho))), np.exp(rho), rtol=1e-6)
