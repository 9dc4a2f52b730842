"""BatchNorm with a hand-written backward pass: ``flax.linen.BatchNorm``'s function and variables.

The forward pass is Flax's (``use_fast_variance``: the batch mean and mean of squares, averaged
over the ``pmap`` axis in one ``pmean``; ``y = (x - mean) * (rsqrt(var + eps) * scale) + bias``;
the running statistics updated as ``m * old + (1 - m) * batch``). The backward pass is the
closed form of batch normalisation's gradient,

    dx = scale * r * (dy - mean(dy) - x_hat * mean(dy * x_hat)),   x_hat = (x - mean) * r,

with ``r = rsqrt(var + eps)`` and the means over every image of every device (two reductions
per channel, one ``psum``), ``dscale = sum(dy * x_hat)`` and ``dbias = sum(dy)`` over the
device's own images. Autodiff of the forward graph computes the same values with more passes
over the activation (the chains through the mean and the variance); on XLA:CPU the hand-written
form made the default model's FP step 0.94x as long (docs/performance.md). Same values to float
rounding (``tests/test_batchnorm.py``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["BatchNorm", "batch_norm_train"]


def _stats(x, axis_name):
    axes = tuple(range(x.ndim - 1))
    mean, mean2 = x.mean(axes), (x * x).mean(axes)
    if axis_name is not None:
        both = lax.pmean(jnp.stack([mean, mean2]), axis_name)
        mean, mean2 = both[0], both[1]
    return mean, jnp.maximum(0.0, mean2 - mean * mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name):
    """Train-mode BN of ``x`` ``[..., C]`` (float32): ``(y, batch mean, batch var)``.

    Only ``y`` carries a gradient; the statistics are for the running averages.
    """
    return _forward(x, scale, bias, epsilon, axis_name)[0]


def _normalize(x, mean, r, scale, bias):
    """``(x - mean) * (r * scale) + bias`` with ``r = rsqrt(var + eps)``: both modes' output."""
    return (x - mean) * (r * scale) + bias


def _forward(x, scale, bias, epsilon, axis_name):
    mean, var = _stats(x, axis_name)
    r = lax.rsqrt(var + epsilon)
    return (_normalize(x, mean, r, scale, bias), mean, var), (x, mean, r, scale)


def _backward(epsilon, axis_name, res, cotangents):
    dy = cotangents[0]  # the statistics' cotangents are zero: nothing downstream reads them
    x, mean, r, scale = res
    axes = tuple(range(x.ndim - 1))
    xc = x - mean
    sum_dy, sum_dy_xc = jnp.sum(dy, axes), jnp.sum(dy * xc, axes)
    count = x.size // x.shape[-1]
    if axis_name is not None:
        both = lax.psum(jnp.stack([sum_dy, sum_dy_xc]), axis_name)
        all_dy, all_dy_xc = both[0], both[1]
        count = count * lax.psum(1, axis_name)
    else:
        all_dy, all_dy_xc = sum_dy, sum_dy_xc
    dx = (r * scale) * (dy - all_dy / count - xc * (r * r) * (all_dy_xc / count))
    return dx, sum_dy_xc * r, sum_dy


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` over the last axis (same variables: ``params`` ``scale`` and
    ``bias``, ``batch_stats`` ``mean`` and ``var``) with :func:`batch_norm_train`'s backward.

    Attributes:
      use_running_average: normalise with the running statistics (eval) instead of the batch's.
      momentum: running average ``m * old + (1 - m) * batch``.
      epsilon: added to the variance.
      axis_name: ``pmap`` axis to average batch statistics over (synchronised BN); ``None``:
        this device's batch.
      dtype: output dtype; statistics and normalisation are computed in float32 (or wider).
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        out_dtype = self.dtype or x.dtype
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            r = lax.rsqrt(ra_var.value + self.epsilon)
            return _normalize(x, ra_mean.value, r, scale, bias).astype(out_dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(out_dtype)
