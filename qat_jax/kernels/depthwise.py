"""The depthwise conv on XLA:CPU as two compiled kernels (``depthwise_cpu.cc``) under one VJP.

:func:`depthwise_conv2d` is ``lax.conv_general_dilated`` with ``feature_group_count = C`` and a
channel multiplier of 1 (NHWC, HWIO kernel ``[kh, kw, 1, C]``, symmetric padding), computed by
the forward kernel; its VJP calls the backward kernel, which computes the input and the kernel
gradients in one pass over the output gradient. The forward kernel sums the taps in the order of
:mod:`qat_jax.ops`' shifted-tap path (row by row, left to right); the gradients are sums in
another order. All equal ``lax.conv``'s to float rounding (``tests/test_kernels.py``).

Used by :func:`qat_jax.ops.conv2d` with ``impl='cpu_ffi'`` (and ``'auto'`` on CPU where it builds).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import numpy as np

from qat_jax.kernels import build

__all__ = ["available", "depthwise_conv2d", "ensure_loaded", "supports"]

_TARGETS = (
    ("qat_jax_depthwise_forward", "QatJaxDepthwiseForward"),
    ("qat_jax_depthwise_backward", "QatJaxDepthwiseBackward"),
)


@functools.cache
def available() -> bool:
    """Whether the kernels build and load here (once per process). When they do not, ``'auto'``
    falls back to the shifted-tap path: one warning says why."""
    try:
        ensure_loaded()
    except build.KernelUnavailable as e:
        warnings.warn(
            f"qat_jax: compiled depthwise kernel unavailable ({e}); conv_impl='auto' uses the "
            "slower shifted-tap path on CPU",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def ensure_loaded() -> str:
    """Build/load the kernels (once per process); :class:`build.KernelUnavailable` if impossible."""
    return build.load("depthwise_cpu", _TARGETS)


def supports(x_shape, kernel_shape, dtype, padding, groups: int) -> bool:
    """Whether a conv is one the kernels compute: float32, NHWC, depthwise with channel
    multiplier 1, symmetric padding."""
    kh, kw, cin_g, cout = kernel_shape
    c = x_shape[-1]
    return (
        len(x_shape) == 4
        and np.dtype(dtype) == np.float32
        and groups == c
        and cin_g == 1
        and cout == c
        and len(padding) == 2
        and all(lo == hi >= 0 for lo, hi in padding)
    )


def _attrs(strides, padding) -> dict:
    return {
        "sh": np.int64(strides[0]),
        "sw": np.int64(strides[1]),
        "ph": np.int64(padding[0][0]),
        "pw": np.int64(padding[1][0]),
    }


def _call(target: str, out_shapes, *args, strides, padding):
    outs = tuple(jax.ShapeDtypeStruct(tuple(s), np.float32) for s in out_shapes)
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(
        *args, **_attrs(strides, padding)
    )


def _out_shape(x_shape, k_shape, strides, padding):
    n, h, w, c = x_shape
    kh, kw = k_shape[:2]
    ho = (h + 2 * padding[0][0] - kh) // strides[0] + 1
    wo = (w + 2 * padding[1][0] - kw) // strides[1] + 1
    return (n, ho, wo, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, k, strides, padding):
    out_shape = _out_shape(x.shape, k.shape, strides, padding)
    return _call(_TARGETS[0][0], [out_shape], x, k, strides=strides, padding=padding)[0]


def _depthwise_fwd(x, k, strides, padding):
    return _depthwise(x, k, strides, padding), (x, k)


def _depthwise_bwd(strides, padding, res, g):
    x, k = res
    dx, dk = _call(_TARGETS[1][0], [x.shape, k.shape], x, g, k, strides=strides, padding=padding)
    return dx, dk


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> jax.Array:
    """Depthwise conv of ``x`` ``[N, H, W, C]`` (float32) with ``kernel`` ``[kh, kw, 1, C]``.

    ``padding`` is per spatial dim ``(lo, hi)`` with ``lo == hi``. Raises ``ValueError`` for a
    conv :func:`supports` rejects and :class:`build.KernelUnavailable` when the kernels cannot
    be built on this machine.
    """
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if (
        not supports(x.shape, kernel.shape, x.dtype, padding, x.shape[-1])
        or kernel.dtype != x.dtype
    ):
        raise ValueError(
            "the depthwise kernel takes float32 x [N,H,W,C] and kernel [kh,kw,1,C] with symmetric "
            f"padding; got x {x.shape} {x.dtype}, kernel {kernel.shape} {kernel.dtype}, "
            f"padding {padding}"
        )
    ensure_loaded()
    return _depthwise(x, kernel[:, :, 0, :], strides, padding)
