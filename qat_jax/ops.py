"""Convolution primitives shared by every layer: one conv entry point and one patch extractor.

Layout conventions (used everywhere in qat_jax):

* activations are NHWC, kernels are HWIO (Flax's layout: ``(kh, kw, C_in // groups, C_out)``);
* padding is symmetric ``k // 2`` on each side (PyTorch/torchvision semantics, so imported
  torchvision weights give the same outputs; XLA's ``'SAME'`` pads asymmetrically at stride 2);
* the **im2col order** of a patch is ``(kh, kw, c_in)`` with ``c_in`` fastest, i.e. patch index
  ``d = (i * kw + j) * C_in_per_group + c``. This is exactly the row order of
  ``kernel.reshape(kh * kw * C_in_per_group, C_out)``, so ``patch @ kernel_matrix`` equals the conv.

``conv2d`` picks an implementation per backend behind one function. XLA:CPU is slow on depthwise
(``feature_group_count``) and 1x1 convolutions, so on CPU depthwise convs run as ``kh*kw`` shifted
multiply-adds and 1x1 convs as an einsum (``'cpu'``); on GPU/TPU ``lax.conv_general_dilated`` is
used (``'xla'``). ``'cpu_ffi'`` is ``'cpu'`` with the float32 depthwise convs computed by compiled
kernels (:mod:`qat_jax.kernels.depthwise`), built on first use; ``'auto'`` picks it on CPU
wherever it builds. All implementations compute the
same function (tested in ``tests/test_ops.py`` and ``tests/test_kernels.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qat_jax.kernels import depthwise

__all__ = ["IMPLS", "conv2d", "extract_patches", "same_padding", "resolve_impl"]

#: The conv implementations of :func:`conv2d` (``impl``).
IMPLS = ("auto", "xla", "cpu", "cpu_ffi")


def same_padding(kernel_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Symmetric ``k // 2`` padding per spatial dim (PyTorch's ``padding=k//2``)."""
    return tuple((k // 2, k // 2) for k in kernel_size)


def resolve_impl(impl: str) -> str:
    """Map ``'auto'`` to ``'xla'`` on GPU/TPU and, on the CPU backend, to ``'cpu_ffi'`` where the
    compiled kernels build (:func:`qat_jax.kernels.depthwise.available`), else ``'cpu'``."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        return "cpu_ffi" if depthwise.available() else "cpu"
    if impl == "cpu_ffi" and jax.default_backend() != "cpu":
        raise ValueError(
            f"conv impl 'cpu_ffi' runs on the CPU backend only, not {jax.default_backend()!r}: "
            "use 'auto'"
        )
    return impl


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // s + 1


def _shifted_views(x, kernel_size, strides, padding):
    """Yield ``((i, j), view)`` with ``view[n, y, x, c] = x_pad[n, y*s + i, x*s + j, c]``."""
    kh, kw = kernel_size
    sh, sw = strides
    n, h, w, c = x.shape
    ho = _out_size(h, kh, sh, padding[0])
    wo = _out_size(w, kw, sw, padding[1])
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    for i in range(kh):
        for j in range(kw):
            yield (
                (i, j),
                lax.slice(
                    xp,
                    (0, i, j, 0),
                    (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1),
                ),
            )


def extract_patches(
    x: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int] = (1, 1),
    padding: Sequence[tuple[int, int]] | None = None,
) -> jax.Array:
    """Im2col patches of an NHWC tensor.

    Args:
      x: ``[N, H, W, C]``.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: per-dim ``(lo, hi)``; default symmetric ``k // 2``.

    Returns:
      ``[N, Ho, Wo, kh * kw, C]``; flattening the last two axes gives the ``(kh, kw, c)`` im2col
      order of the module docstring. Padded positions are 0.
    """
    kernel_size = tuple(kernel_size)
    padding = same_padding(kernel_size) if padding is None else tuple(map(tuple, padding))
    views = [v for _, v in _shifted_views(x, kernel_size, tuple(strides), padding)]
    return jnp.stack(views, axis=3)


def _conv_xla(x, kernel, strides, padding, groups, precision):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=precision,
    )


def _conv_cpu(x, kernel, strides, padding, groups, precision, ffi=False):
    """``ffi``: ``True`` computes supported depthwise convs with the compiled kernel,
    ``'auto'`` too where it builds (built, or found unavailable, only once such a conv is met)."""
    kh, kw, cin_g, cout = kernel.shape
    cin = x.shape[-1]
    if (
        ffi
        and kernel.dtype == x.dtype
        and depthwise.supports(x.shape, kernel.shape, x.dtype, padding, groups)
        and (ffi is True or depthwise.available())
    ):
        return depthwise.depthwise_conv2d(x, kernel, strides, padding)
    if groups == cin and cin_g == 1 and cout == cin:
        # Depthwise with channel multiplier 1: kh*kw shifted multiply-adds.
        out = None
        for (i, j), v in _shifted_views(x, (kh, kw), strides, padding):
            term = v * kernel[i, j, 0, :].astype(v.dtype)
            out = term if out is None else out + term
        return out
    if groups == 1 and kh == 1 and kw == 1 and all(p == (0, 0) for p in padding):
        xs = x[:, :: strides[0], :: strides[1], :]
        return _pointwise(xs, kernel[0, 0], precision)
    return _conv_xla(x, kernel, strides, padding, groups, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, w, precision):
    """1x1 conv ``[N, H, W, C] x [C, O] -> [N, H, W, O]`` as one matmul.

    Its own VJP only orders the weight gradient's matmul: autodiff of the einsum computes
    ``dW = X^T G`` and XLA:CPU then transposes ``G`` (``[M, O]``, the wider operand of an expand
    conv, BN backward fused in) into ``[O, M]`` before the matmul; ``(G^T X)^T`` transposes the
    other operand and only the small ``[O, C]`` result. Same values to float rounding
    (``tests/test_ops.py``); about a third off the FP step of the default model on XLA:CPU
    (docs/performance.md).
    """
    return jnp.einsum("nhwc,co->nhwo", x, w, precision=precision)


def _pointwise_fwd(x, w, precision):
    return _pointwise(x, w, precision), (x, w)


def _pointwise_bwd(precision, res, g):
    x, w = res
    dx = jnp.einsum("nhwo,co->nhwc", g, w, precision=precision)
    m = x.shape[0] * x.shape[1] * x.shape[2]
    dw_t = jnp.einsum("mo,mc->oc", g.reshape(m, -1), x.reshape(m, -1), precision=precision)
    return dx.astype(x.dtype), dw_t.T.astype(w.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[tuple[int, int]] | None = None,
    feature_group_count: int = 1,
    impl: str = "auto",
    precision=None,
) -> jax.Array:
    """2-D convolution, NHWC x HWIO -> NHWC, with the backend's fastest implementation.

    Args:
      x: ``[N, H, W, C_in]``.
      kernel: ``[kh, kw, C_in // feature_group_count, C_out]``.
      strides: ``(sh, sw)``.
      padding: per-dim ``(lo, hi)``; default symmetric ``k // 2``.
      feature_group_count: groups; ``C_in`` for a depthwise conv.
      impl: ``'auto'`` (per backend), ``'xla'`` (``lax.conv_general_dilated``), ``'cpu'`` or
        ``'cpu_ffi'`` (``'cpu'`` with the compiled depthwise kernel for float32 depthwise convs;
        raises :class:`qat_jax.kernels.build.KernelUnavailable` where it cannot be built).
      precision: passed to XLA.
    """
    kh, kw = kernel.shape[:2]
    padding = same_padding((kh, kw)) if padding is None else tuple(map(tuple, padding))
    strides = tuple(strides)
    if impl == "auto" and jax.default_backend() == "cpu":
        # resolve_impl's 'auto', decided per conv: a model without depthwise convs never builds
        # the kernel.
        return _conv_cpu(x, kernel, strides, padding, feature_group_count, precision, ffi="auto")
    resolved = resolve_impl(impl)
    if resolved in ("cpu", "cpu_ffi"):
        return _conv_cpu(
            x, kernel, strides, padding, feature_group_count, precision, ffi=resolved == "cpu_ffi"
        )
    return _conv_xla(x, kernel, strides, padding, feature_group_count, precision)
