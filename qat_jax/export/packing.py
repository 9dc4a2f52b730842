"""Bit packing of ±1 tensors and the XNOR-popcount binary convolution on packed words.

Packing convention (the ``.qat`` file and the packed forward use exactly this; see
docs/deployment.md):

* a ±1 value is one bit: **bit 1 <-> +1, bit 0 <-> -1**;
* a row of ``d`` bits is stored in ``ceil(d / 32)`` **uint32** words; bit ``k`` of the row is bit
  ``k % 32`` (LSB first) of word ``k // 32``; the unused high bits of the last word are 0;
* words are little-endian in the file, so a row is byte-identical to
  ``np.packbits(bits_padded_to_a_multiple_of_32, bitorder='little')``.

The row of a binary conv's output channel ``o`` (group ``g = o // dg``) is its patch in the
im2col order ``(kh, kw, c)`` with ``c`` fastest (:mod:`qat_jax.ops`), ``d = kh * kw * C_in / G``;
a depthwise 3x3 conv has one 9-bit row (one word) per channel.

:func:`binary_conv_packed` computes ``sum_k B[o, k] * a[k]`` over a patch of binarized inputs
``a = sign(x - tau)`` (padding contributes 0) from packed words only::

    matches = popcount(~(a_words ^ w_words) & valid_words)      (XNOR, then mask)
    dot     = 2 * matches - popcount(valid_words)                (int32)

where ``valid_words`` packs 1 for every patch position inside the image (0 for zero padding and
for the unused bits of the last word).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qat_jax import ops

__all__ = [
    "WORD_BITS",
    "num_words",
    "pack_rows",
    "unpack_rows",
    "pack_bits_jax",
    "binary_conv_packed",
]

WORD_BITS = 32


def num_words(d: int) -> int:
    """Number of uint32 words of a ``d``-bit row."""
    return -(-int(d) // WORD_BITS)


def pack_rows(signs: np.ndarray) -> np.ndarray:
    """±1 array ``[..., d]`` -> uint32 words ``[..., ceil(d / 32)]`` (bit 1 <-> +1, LSB first).

    Raises:
      ValueError: an entry is not ±1.
    """
    signs = np.asarray(signs)
    if not np.all((signs == 1) | (signs == -1)):
        raise ValueError("pack_rows expects a ±1 array")
    d = signs.shape[-1]
    nw = num_words(d)
    bits = np.zeros((*signs.shape[:-1], nw * WORD_BITS), np.uint8)
    bits[..., :d] = signs > 0
    packed = np.packbits(bits, axis=-1, bitorder="little")  # [..., nw * 4] bytes
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


def unpack_rows(words: np.ndarray, d: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: uint32 ``[..., nw]`` -> int8 ±1 ``[..., d]``."""
    words = np.ascontiguousarray(np.asarray(words, np.uint32).astype("<u4"))
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[..., :d]
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def pack_bits_jax(bits: jax.Array) -> jax.Array:
    """0/1 uint32 array ``[..., d]`` -> uint32 words ``[..., ceil(d / 32)]`` (same convention)."""
    d = bits.shape[-1]
    nw = num_words(d)
    bits = jnp.pad(bits.astype(jnp.uint32), [(0, 0)] * (bits.ndim - 1) + [(0, nw * WORD_BITS - d)])
    bits = bits.reshape(*bits.shape[:-1], nw, WORD_BITS)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    # Distinct bit positions: the sum is the bitwise OR and cannot overflow.
    return jnp.sum(jnp.left_shift(bits, shifts), axis=-1, dtype=jnp.uint32)


def _grouped_patch_words(z: jax.Array, kernel_size, strides, groups: int) -> jax.Array:
    """uint32 0/1 ``[N, H, W, C]`` -> packed patches ``[N, Ho, Wo, G, nw]`` (padding bit 0)."""
    kh, kw = kernel_size
    n, _, _, c = z.shape
    p = ops.extract_patches(z, (kh, kw), strides)  # [N, Ho, Wo, kh*kw, C], padded 0
    ho, wo = p.shape[1:3]
    p = p.reshape(n, ho, wo, kh * kw, groups, c // groups).transpose(0, 1, 2, 4, 3, 5)
    return pack_bits_jax(p.reshape(n, ho, wo, groups, kh * kw * (c // groups)))


def binary_conv_packed(
    x: jax.Array,
    tau: jax.Array,
    words: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int] = (1, 1),
    groups: int = 1,
) -> jax.Array:
    """Integer output of a W1A1 conv from packed weights: ``sum_k B[o, k] * sign(x - tau)[k]``.

    Args:
      x: ``[N, H, W, C_in]`` float input (before binarization).
      tau: ``[C_in]`` activation thresholds; the input bit is ``x - tau >= 0`` (sign(0) = +1, the
        training-time convention).
      words: ``[C_out, nw]`` uint32 packed rows of ``B`` (``nw = ceil(kh*kw*C_in/G / 32)``).
      kernel_size, strides: spatial; padding is symmetric ``k // 2`` and contributes 0.
      groups: ``G`` (``C_in`` for a depthwise conv).

    Returns:
      int32 ``[N, Ho, Wo, C_out]``: the exact ±1 dot products (no float arithmetic involved).
    """
    n, h, w, c = x.shape
    c_out = words.shape[0]
    bits = (x - tau.astype(x.dtype) >= 0).astype(jnp.uint32)
    a = _grouped_patch_words(bits, kernel_size, strides, groups)  # [N, Ho, Wo, G, nw]
    ones = jnp.ones((1, h, w, c), jnp.uint32)
    m = _grouped_patch_words(ones, kernel_size, strides, groups)  # [1, Ho, Wo, G, nw]
    wg = words.astype(jnp.uint32).reshape(groups, c_out // groups, -1)  # [G, dg, nw]
    xnor = ~(a[..., :, None, :] ^ wg) & m[..., :, None, :]  # [N, Ho, Wo, G, dg, nw]
    matches = jnp.sum(lax.population_count(xnor).astype(jnp.int32), axis=-1)
    n_valid = jnp.sum(lax.population_count(m).astype(jnp.int32), axis=-1)[..., None]
    dot = 2 * matches - n_valid  # [N, Ho, Wo, G, dg]
    return dot.reshape(n, dot.shape[1], dot.shape[2], c_out)
