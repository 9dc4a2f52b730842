"""The input-dependent, task-trained orthonormal transform of a layer (docs/method.md,
'The transform').

For a layer with input patches ``x`` of dimension ``d`` (im2col order, see :mod:`qat_jax.ops`):

* calibration accumulates the second moment ``Sigma = E[x x^T]`` and :func:`pca_init` returns its
  eigenbasis ``V0`` and eigenvalues ``lam`` (sorted descending) -- data, not trained;
* :func:`cayley` maps an unconstrained square parameter ``P`` to the orthonormal
  ``Q = (I - A)(I + A)^-1`` with ``A = P - P^T``; the trained basis is ``V = V0 @ Q`` (``V = V0`` at
  ``P = 0``);
* the importance vector is ``s = exp(rho)``, initialised by :func:`init_rho` to ``s^2 ~ lam^gamma``;
* :func:`correlation` returns ``C = V diag(s^2) V^T`` normalised to mean eigenvalue 1
  (``trace(C) = d``), so ``W C`` keeps the scale of ``W``.

Every function is batched over leading axes: a depthwise conv has one ``d x d`` transform per
channel (``P`` of shape ``[C, d, d]``), a regular conv or dense layer one (``[1, d, d]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Transform math runs at full float32 precision on every backend (TPU's default matmul precision is
# bfloat16, which would break orthonormality at 1e-5 and flip signs of B near zero).
_HI = lax.Precision.HIGHEST

__all__ = [
    "cayley",
    "pca_init",
    "init_rho",
    "importance",
    "correlation",
    "trained_basis",
    "orthonormality_error",
]


def cayley(p: jax.Array) -> jax.Array:
    """Orthonormal Cayley transform of an unconstrained square parameter.

    ``Q = (I - A)(I + A)^-1`` with ``A = P - P^T`` (skew-symmetric, so ``I + A`` is always
    invertible). Computed as the linear solve ``(I + A)^-1 (I - A)``, which equals the product above
    because both factors are functions of ``A`` and commute. ``Q = I`` at ``P = 0``.

    Args:
      p: ``[..., d, d]``.

    Returns:
      ``[..., d, d]`` with ``Q^T Q = I``.
    """
    if p.shape[-1] != p.shape[-2]:
        raise ValueError(f"cayley needs square matrices, got shape {p.shape}")
    a = p - jnp.swapaxes(p, -1, -2)
    return jnp.linalg.solve(_add_identity(a), _add_identity(-a))


def _add_identity(m: jax.Array) -> jax.Array:
    """``m + I`` as a diagonal scatter-add.

    XLA:CPU (jax 0.10.2) segfaults on ``jit`` of ``jnp.eye(d) + P - P.T`` for d around 900-1000
    (a fusion of the iota-built identity with the transpose); the scatter-add avoids that fusion.
    ``tests/test_transform.py::test_cayley_jit_d960_runs`` guards it.
    """
    idx = jnp.arange(m.shape[-1])
    return m.at[..., idx, idx].add(jnp.asarray(1, m.dtype))


def _xp(x):
    """``numpy`` for a numpy input (runs on the host, compiles nothing), else ``jax.numpy``."""
    return np if isinstance(x, np.ndarray) else jnp


def pca_init(second_moment: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposition of an accumulated second moment, safe for rank-deficient inputs.

    A numpy input is decomposed by numpy on the host in its own dtype (the trainer's calibration
    passes float64: no XLA program per layer shape, see ``docs/performance.md``); a jax input by
    ``jnp.linalg.eigh`` (jittable).

    Args:
      second_moment: ``[..., d, d]``, symmetric positive semi-definite up to rounding.
      eps: eigenvalues below ``eps * max(lam)`` are clamped to that floor (and to 0 when the whole
        matrix is 0), so a rank-deficient input gives finite importances.

    Returns:
      ``(V0, lam)``: ``V0`` ``[..., d, d]`` orthonormal, columns are eigenvectors sorted by
      eigenvalue descending; ``lam`` ``[..., d]`` non-negative, descending.
    """
    xp = _xp(second_moment)
    sym = 0.5 * (second_moment + xp.swapaxes(second_moment, -1, -2))
    lam, vecs = xp.linalg.eigh(sym)  # ascending
    lam = lam[..., ::-1]
    vecs = vecs[..., ::-1]
    top = xp.max(lam, axis=-1, keepdims=True)
    lam = xp.maximum(lam, eps * xp.maximum(top, 0.0))
    return vecs, lam


def init_rho(lam: jax.Array, gamma: float, floor: float = 1e-6) -> jax.Array:
    """Importance log-scales ``rho`` with ``s^2 = exp(2 rho) ~ lam^gamma`` (mean-normalised).

    ``gamma = 0`` gives ``s = 1`` (plain sign of ``W`` when ``V = I``); ``gamma = 1`` gives
    ``C = Sigma`` up to scale. Eigenvalues below ``floor * mean(lam)`` are floored. Like
    :func:`pca_init`, a numpy input is computed by numpy.
    """
    xp = _xp(lam)
    mean = xp.mean(lam, axis=-1, keepdims=True)
    safe_mean = xp.where(mean > 0, mean, 1.0)
    ratio = xp.maximum(lam / safe_mean, floor)
    rho = 0.5 * gamma * xp.log(ratio)
    return xp.where(mean > 0, rho, 0.0)


def importance(rho: jax.Array) -> jax.Array:
    """The (positive) importance vector ``s = exp(rho)``."""
    return jnp.exp(rho)


def trained_basis(v0: jax.Array, p: jax.Array) -> jax.Array:
    """``V = V0 @ cayley(P)``: orthonormal for every ``P``."""
    return jnp.matmul(v0, cayley(p), precision=_HI)


def correlation(v: jax.Array, rho: jax.Array, normalize: bool = True) -> jax.Array:
    """Task-adapted correlation ``C = V diag(s^2) V^T`` with ``s = exp(rho)``.

    Args:
      v: ``[..., d, d]`` orthonormal basis.
      rho: ``[..., d]`` log-importances.
      normalize: divide ``s^2`` by its mean so that ``C``'s mean eigenvalue is 1.

    Returns:
      ``[..., d, d]`` symmetric positive definite.
    """
    s2 = jnp.exp(2.0 * rho)
    if normalize:
        s2 = s2 / jnp.mean(s2, axis=-1, keepdims=True)
    return jnp.matmul(v * s2[..., None, :], jnp.swapaxes(v, -1, -2), precision=_HI)


def orthonormality_error(v: jax.Array) -> jax.Array:
    """``max |V^T V - I|`` over all matrices in the batch."""
    eye = jnp.eye(v.shape[-1], dtype=v.dtype)
    return jnp.max(jnp.abs(jnp.matmul(jnp.swapaxes(v, -1, -2), v, precision=_HI) - eye))
