"""Sign quantizers with custom gradients (``jax.custom_vjp``).

Convention: **sign(0) = +1**. Every quantizer here returns exactly ``+1`` or ``-1`` (in the input's
dtype), never 0, so a binarized tensor is always bit-packable (bit 1 <-> +1, bit 0 <-> -1).

* :func:`ste_sign` -- straight-through estimator with a clipped-identity backward:
  ``d/dx = 1[|x| <= clip]`` (``clip`` broadcastable; ``clip=None`` means no clipping).
* :func:`approx_sign` -- Bi-Real's ApproxSign backward: ``d/dx = max(0, 2 - 2|x|)``.
* :func:`rsign` -- sign with a learnable threshold, ``sign(x - tau)`` (ReActNet's RSign), with the
  ApproxSign backward for both ``x`` and ``tau`` (``d/dtau = -d/dx``).
* :func:`xnor_binarize` -- XNOR-Net weight binarizer ``mean|W| * sign(W)`` per output channel,
  gradients by the STE for ``sign`` and exactly through ``mean|W|``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sign", "ste_sign", "approx_sign", "rsign", "xnor_binarize"]


def sign(x: jax.Array) -> jax.Array:
    """Hard sign with ``sign(0) = +1``; no gradient (use the quantizers below to train)."""
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@jax.custom_vjp
def _ste_sign(x, clip):
    return sign(x)


def _ste_sign_fwd(x, clip):
    return sign(x), (x, clip)


def _ste_sign_bwd(res, g):
    x, clip = res
    grad_x = jnp.where(jnp.abs(x) <= clip, g, jnp.zeros_like(g))
    return grad_x, jnp.zeros_like(clip)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def ste_sign(x: jax.Array, clip: float | jax.Array | None = 1.0) -> jax.Array:
    """``sign(x)`` forward; straight-through ``g * 1[|x| <= clip]`` backward.

    Args:
      x: any shape, floating dtype.
      clip: scalar or array broadcastable to ``x`` (e.g. a per-row threshold); ``None`` disables
        clipping (plain identity STE). Receives no gradient.
    """
    x = jnp.asarray(x)
    clip = jnp.inf if clip is None else clip
    clip = jnp.broadcast_to(jnp.asarray(clip, x.dtype), x.shape)
    return _ste_sign(x, jax.lax.stop_gradient(clip))


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
    """``sign(x)`` forward; ApproxSign backward ``g * max(0, 2 - 2|x|)`` (zero for ``|x| >= 1``)."""
    return sign(x)


def _approx_sign_fwd(x):
    return sign(x), x


def _approx_sign_bwd(x, g):
    return (g * jnp.maximum(0.0, 2.0 - 2.0 * jnp.abs(x)).astype(g.dtype),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


def rsign(x: jax.Array, tau: jax.Array, grad: str = "approx", clip: float = 1.0) -> jax.Array:
    """Thresholded sign ``sign(x - tau)`` (ReActNet's RSign).

    Args:
      x: ``[..., C]``.
      tau: ``[C]`` (or broadcastable), the learnable threshold.
      grad: ``'approx'`` (ApproxSign backward) or ``'ste'`` (clipped identity with ``clip``).
    """
    z = x - tau.astype(x.dtype)
    if grad == "approx":
        return approx_sign(z)
    if grad == "ste":
        return ste_sign(z, clip)
    raise ValueError(f"grad must be 'approx' or 'ste', got {grad!r}")


def xnor_binarize(kernel: jax.Array, out_axis: int = -1, clip: float | None = None) -> jax.Array:
    """XNOR-Net weights ``alpha_o * sign(W)`` with ``alpha_o = mean|W_o|`` per output channel.

    Args:
      kernel: e.g. HWIO ``[kh, kw, C_in, C_out]`` or dense ``[d_in, d_out]``; the output channel is
        ``out_axis`` (last by default, Flax's layout).
      clip: STE clip of the sign (``None``: identity STE, XNOR-Net's choice).

    Returns:
      Array of ``kernel``'s shape whose entries along each output channel are ``+-alpha_o``.
    """
    out_axis = out_axis % kernel.ndim
    reduce_axes = tuple(a for a in range(kernel.ndim) if a != out_axis)
    alpha = jnp.mean(jnp.abs(kernel), axis=reduce_axes, keepdims=True)
    return alpha * ste_sign(kernel, clip)
