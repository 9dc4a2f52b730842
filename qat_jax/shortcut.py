"""The real-valued shortcut around a binary conv (Bi-Real Net / ReActNet), with channel matching.

Bi-Real Net and ReActNet add the *real-valued* input of every binary conv to its BN output, so the
FP information the binarization destroys still reaches the next layer. A MobileNetV2 conv may
change the channel count and the resolution, so the input is first matched to the output's shape
by a parameter-free map (:func:`shortcut`)::

    y = BN(conv(x)) + match(pool(x))          (the activation, if any, comes after the sum)

* **pool** (conv stride 2): a 2x2 average with stride 2, as ReActNet's ``AvgPool2d(2, 2)``. For an
  odd size the last window is cut by the edge and averages only its entries inside the image
  (ceil mode, padding excluded), so the output has the conv's ``ceil(H / 2)`` rows.
* **match** ``C_in -> C_out`` channels: output channel ``k`` is the mean of the input channels
  ``floor(k * C_in / C_out) <= c < ceil((k + 1) * C_in / C_out)`` (PyTorch's adaptive average
  pooling rule, applied along channels). Its cases:

  - ``C_out == C_in``: the identity;
  - ``C_out = t * C_in`` (expand conv): every input channel **repeated** ``t`` times in place,
    output ``k`` = input ``k // t`` (``jnp.repeat``, not ``jnp.tile``). ReActNet concatenates two
    copies (tile order); the repeat order is our choice because it pairs with the next rule: an
    expand by ``t`` followed by a project back by ``t`` returns the input (a mean of
    ``t`` copies);
  - ``C_in = g * C_out`` (project conv): the mean of ``g`` **consecutive** input channels;
  - neither (e.g. 144 -> 32, or a head conv 48 -> 256): the same formula, whose groups then have
    unequal sizes (and overlap by at most one channel).

Everything here is a pure function without parameters; the models and the packed forward of
:mod:`qat_jax.export` share it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "avg_pool_2x2",
    "channel_groups",
    "group_matrix",
    "match_channels",
    "match_kind",
    "shortcut",
]


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """``[N, H, W, C]`` -> ``[N, ceil(H/2), ceil(W/2), C]``: 2x2 / 2 mean over in-image entries."""
    h, w = x.shape[1], x.shape[2]
    if h % 2 == 0 and w % 2 == 0:
        n, _, _, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
    total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, window, strides, pad)
    ones = jnp.ones((1, h, w, 1), x.dtype)
    count = lax.reduce_window(ones, jnp.zeros((), x.dtype), lax.add, window, strides, pad)
    return total / count


def channel_groups(c_in: int, c_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``, both ``[c_out, L]``: output ``k = sum_l weight[k, l] * x[index[k, l]]``.

    Group ``k`` is ``[floor(k c_in / c_out), ceil((k + 1) c_in / c_out))``; rows shorter than the
    longest group ``L`` are padded with index 0 and weight 0.
    """
    k = np.arange(c_out)
    start = (k * c_in) // c_out
    end = -(-((k + 1) * c_in) // c_out)
    size = end - start
    width = int(size.max())
    offsets = np.arange(width)
    valid = offsets[None, :] < size[:, None]
    index = np.where(valid, start[:, None] + offsets[None, :], 0).astype(np.int32)
    weight = np.where(valid, 1.0 / size[:, None], 0.0).astype(np.float32)
    return index, weight


def match_kind(c_in: int, c_out: int) -> str:
    """``'identity'``, ``'repeat'``, ``'group_mean'`` or ``'adaptive'`` (see the module doc)."""
    if c_in == c_out:
        return "identity"
    if c_out % c_in == 0:
        return "repeat"
    if c_in % c_out == 0:
        return "group_mean"
    return "adaptive"


def match_channels(x: jax.Array, c_out: int) -> jax.Array:
    """Match the last axis of ``x`` to ``c_out`` channels (the rule of the module docstring)."""
    c_in = x.shape[-1]
    kind = match_kind(c_in, c_out)
    if kind == "identity":
        return x
    if kind == "repeat":
        return jnp.repeat(x, c_out // c_in, axis=-1)
    if kind == "group_mean":
        return x.reshape(*x.shape[:-1], c_out, c_in // c_out).mean(axis=-1)
    # The general case as one matmul with the fixed [c_in, c_out] averaging matrix: a gather of
    # the groups costs XLA:CPU a pass per group member over an [..., c_out, L] tensor (the head
    # conv's shortcut was 12 % of the default model's FP step). HIGHEST keeps it float32 on TPU.
    return jnp.einsum(
        "...c,ck->...k",
        x,
        jnp.asarray(group_matrix(c_in, c_out), x.dtype),
        precision=lax.Precision.HIGHEST,
    )


def group_matrix(c_in: int, c_out: int) -> np.ndarray:
    """``[c_in, c_out]`` float32: ``match_channels(x, c_out) == x @ group_matrix(c_in, c_out)``."""
    index, weight = channel_groups(c_in, c_out)
    m = np.zeros((c_in, c_out), np.float32)
    np.add.at(m, (index, np.broadcast_to(np.arange(c_out)[:, None], index.shape)), weight)
    return m


def shortcut(x: jax.Array, c_out: int, stride: int) -> jax.Array:
    """The matched input of a conv with ``c_out`` channels and ``stride`` (1 or 2), NHWC."""
    if stride == 2:
        x = avg_pool_2x2(x)
    elif stride != 1:
        raise ValueError(f"the binary shortcut supports strides 1 and 2, got {stride}")
    return match_channels(x, c_out)
