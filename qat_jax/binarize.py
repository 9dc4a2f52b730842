"""Importance-aware binarization of a weight matrix under a correlation metric.

See docs/method.md, 'Importance-aware binarization'.

A layer's output error for a binary kernel ``W_hat = diag(alpha) B`` is
``E||(W - W_hat) x||^2 = tr((W - W_hat) C (W - W_hat)^T)`` with ``C = E[x x^T]``. qat_jax uses:

* pattern ``B = sign(W C)`` (the first-order optimum; ``sign(W)`` when ``C`` is diagonal);
* per-output-row scale ``alpha_o = (W_o C B_o^T) / (B_o C B_o^T)`` (the exact least-squares optimum
  for the pattern; ``mean|W_o|`` when ``C = I``);
* optional greedy refinement sweeps that flip single entries of ``B`` while the error (with
  ``alpha`` refit) decreases; every sweep is monotone.

Shapes: ``w`` is ``[..., d_out, d_in]`` (leading axes batch independent transforms, e.g. one per
channel of a depthwise conv) and ``c`` is ``[..., d_in, d_in]`` or ``None`` for the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qat_jax.quantizers import sign, ste_sign

__all__ = [
    "importance_binarize",
    "fit_alpha",
    "refine",
    "output_error",
    "xnor_matrix",
]

_EPS = 1e-12


def _apply_c(w: jax.Array, c: jax.Array | None) -> jax.Array:
    return w if c is None else jnp.matmul(w, c, precision=lax.Precision.HIGHEST)


def fit_alpha(w: jax.Array, b: jax.Array, c: jax.Array | None = None) -> jax.Array:
    """Least-squares scale per row, ``alpha_o = (W_o C B_o^T) / (B_o C B_o^T)``: ``[..., d_out]``.

    (``C = I`` when ``c`` is ``None``.)
    """
    bc = _apply_c(b, c)
    num = jnp.sum(w * bc, axis=-1)
    den = jnp.sum(b * bc, axis=-1)
    return num / jnp.maximum(den, _EPS)


def importance_binarize(
    w: jax.Array,
    c: jax.Array | None = None,
    clip: float | None = 3.0,
    refine_sweeps: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """``(B, alpha)`` with ``B = sign(W C)`` and the least-squares ``alpha`` under ``C``.

    Gradients: ``sign`` is the straight-through estimator, clipped relative to each row of
    ``U = W C``: the gradient passes where ``|U_oi| <= clip * rms(U_o)`` (``clip=None``: never
    clipped). ``alpha`` is differentiated exactly. Gradients therefore reach ``W`` and ``C`` (and
    through ``C`` the transform's ``P`` and ``rho``).

    Args:
      w: ``[..., d_out, d_in]`` latent weights.
      c: ``[..., d_in, d_in]`` correlation, or ``None`` for ``C = I`` (XNOR: ``alpha = mean|W_o|``).
      clip: relative STE clip.
      refine_sweeps: greedy flip sweeps (no gradient through the flips; use at freeze time).

    Returns:
      ``B`` ``[..., d_out, d_in]`` in ``{-1, +1}`` and ``alpha`` ``[..., d_out]``.
    """
    u = _apply_c(w, c)
    if clip is None:
        row_clip = None
    else:
        rms = jnp.sqrt(jnp.mean(jnp.square(jax.lax.stop_gradient(u)), axis=-1, keepdims=True))
        row_clip = clip * rms
    b = ste_sign(u, row_clip)
    if refine_sweeps > 0:
        b_ref = refine(jax.lax.stop_gradient(w), jax.lax.stop_gradient(b), c, refine_sweeps)
        b = b + jax.lax.stop_gradient(b_ref - b)
    return b, fit_alpha(w, b, c)


def xnor_matrix(w: jax.Array, clip: float | None = None) -> tuple[jax.Array, jax.Array]:
    """XNOR binarization of ``[..., d_out, d_in]``: ``(sign(W), mean|W_o|)``, the ``C = I`` case."""
    return importance_binarize(w, None, clip=clip)


def output_error(w: jax.Array, w_hat: jax.Array, c: jax.Array | None = None) -> jax.Array:
    """Relative output error ``tr((W - W_hat) C (W - W_hat)^T) / tr(W C W^T)`` per batch entry.

    With ``C = E[x x^T]`` this is ``E||(W - W_hat) x||^2 / E||W x||^2``. Returns ``[...]``.
    """
    diff = w - w_hat
    num = jnp.sum(_apply_c(diff, c) * diff, axis=(-2, -1))
    den = jnp.sum(_apply_c(w, c) * w, axis=(-2, -1))
    return num / jnp.maximum(den, _EPS)


def refine(w: jax.Array, b: jax.Array, c: jax.Array | None, sweeps: int = 1) -> jax.Array:
    """Greedy coordinate sweeps that flip entries of ``B`` to lower the output error.

    For a row with ``alpha`` refit, the error is ``w C w^T - (w C b^T)^2 / (b C b^T)``; a flip of
    ``b_i`` is accepted only when it increases ``(w C b^T)^2 / (b C b^T)``, so no sweep ever
    increases the error. Coordinates are visited in order ``0 .. d_in - 1``; rows and batch entries
    are processed in parallel.

    Args:
      w: ``[..., d_out, d_in]``; b: ``[..., d_out, d_in]`` in ``{-1, +1}``; c: ``[..., d_in, d_in]``
      or ``None`` (identity: ``sign(W)`` is already optimal, returned unchanged).

    Returns:
      The refined ``B`` (no gradient).
    """
    if c is None or sweeps <= 0:
        return b
    w = jax.lax.stop_gradient(w)
    b = jax.lax.stop_gradient(b)
    c = jax.lax.stop_gradient(c)
    d = w.shape[-1]
    wc = _apply_c(w, c)  # [..., d_out, d_in]; C symmetric so (wC)_i = (Cw)_i
    c_diag = jnp.diagonal(c, axis1=-2, axis2=-1)[..., None, :]  # [..., 1, d_in]

    def visit(i, carry):
        b, cb, num, den = carry
        b_i = b[..., i]
        num_new = num - 2.0 * b_i * wc[..., i]
        den_new = den - 4.0 * b_i * cb[..., i] + 4.0 * c_diag[..., i]
        gain_old = num**2 / jnp.maximum(den, _EPS)
        gain_new = num_new**2 / jnp.maximum(den_new, _EPS)
        flip = (gain_new > gain_old * (1.0 + 1e-7)) & (den_new > _EPS)
        sgn = jnp.where(flip, -1.0, 1.0).astype(b.dtype)
        c_col = c[..., :, i][..., None, :]  # [..., 1, d_in]
        cb = jnp.where(flip[..., None], cb - 2.0 * b_i[..., None] * c_col, cb)
        b = b.at[..., i].multiply(sgn)
        num = jnp.where(flip, num_new, num)
        den = jnp.where(flip, den_new, den)
        return b, cb, num, den

    cb = _apply_c(b, c)  # [..., d_out, d_in]
    num = jnp.sum(wc * b, axis=-1)
    den = jnp.sum(cb * b, axis=-1)
    carry = (b, cb, num, den)
    for _ in range(sweeps):
        carry = jax.lax.fori_loop(0, d, visit, carry)
    return sign(carry[0])
