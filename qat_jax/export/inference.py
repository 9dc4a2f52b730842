"""The packed forward: runs a ``.qat`` op list in JAX, binary convs by XNOR-popcount on uint32 words.

:func:`packed_forward` is a pure function of ``(ops, tensors, x)``; :func:`make_packed_forward`
jits it for one op list. Binary convs never see a float weight: their weights stay packed words,
their inputs are packed into words, and the accumulation is int32 (see
:func:`qat_jax.export.packing.binary_conv_packed`). Floats appear only where the deployed network
is FP: the stem conv, the folded BN affine after each conv, ReLU6/ReLU, residual adds, the
real-valued shortcuts (``shortcut_add``), pooling and the classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qat_jax import ops as qops
from qat_jax.export.packing import binary_conv_packed
from qat_jax.shortcut import shortcut

__all__ = ["packed_forward", "make_packed_forward"]


def _conv(op, t, x):
    y = qops.conv2d(
        x,
        t[op["kernel"]],
        tuple(op["strides"]),
        padding=tuple(tuple(p) for p in op["padding"]),
        feature_group_count=int(op["groups"]),
    )
    return y + t[op["bias"]]


def _binary_conv(op, t, x):
    pad = [tuple(p) for p in op["padding"]]
    if pad != [(k // 2, k // 2) for k in op["kernel_size"]]:
        raise ValueError(f"{op['name']}: only symmetric k//2 padding is supported, got {pad}")
    dot = binary_conv_packed(
        x,
        t[op["tau"]],
        t[op["weights"]],
        tuple(op["kernel_size"]),
        tuple(op["strides"]),
        int(op["groups"]),
    )
    return dot.astype(jnp.float32) * t[op["scale"]] + t[op["shift"]]


def _max_pool(op, t, x):
    (wh, ww), (sh, sw) = op["window"], op["strides"]
    pad = ((0, 0), *(tuple(p) for p in op["padding"]), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, wh, ww, 1), (1, sh, sw, 1), pad)


def _rprelu(op, t, x):
    z = x - t[op["shift_in"]]
    return jnp.where(z > 0, z, t[op["slope"]] * z) + t[op["shift_out"]]


def _shortcut_add(op, y, x):
    if x.shape[-1] != int(op["c_in"]) or y.shape[-1] != int(op["c_out"]):
        raise ValueError(
            f"shortcut_add: inputs have {y.shape[-1]} and {x.shape[-1]} channels, the op says "
            f"c_out={op['c_out']}, c_in={op['c_in']}"
        )
    sh, sw = op["stride"]
    if sh != sw:
        raise ValueError(f"shortcut_add: only square strides are supported, got {op['stride']}")
    return y + shortcut(x, int(op["c_out"]), int(sh))


_OPS: dict[str, Callable] = {
    "rprelu": _rprelu,
    "conv": _conv,
    "binary_conv": _binary_conv,
    "relu": lambda op, t, x: jnp.maximum(x, 0.0),
    "relu6": lambda op, t, x: jnp.clip(x, 0.0, 6.0),
    "max_pool": _max_pool,
    "mean": lambda op, t, x: jnp.mean(x, axis=(1, 2)),
    "dense": lambda op, t, x: jnp.dot(x, t[op["kernel"]]) + t[op["bias"]],
}


def packed_forward(ops: Sequence[Mapping], tensors: Mapping[str, jax.Array], x: jax.Array):
    """Logits ``[N, num_classes]`` of the op list on NHWC float32 input ``x``."""
    env = {"x": jnp.asarray(x, jnp.float32)}
    for op in ops:
        kind = op["op"]
        if kind == "add":
            a, b = op["in"]
            env[op["out"]] = env[a] + env[b]
        elif kind == "shortcut_add":
            env[op["out"]] = _shortcut_add(op, env[op["in"][0]], env[op["in"][1]])
        elif kind in _OPS:
            env[op["out"]] = _OPS[kind](op, tensors, env[op["in"]])
        else:
            raise ValueError(f"unknown op {kind!r}")
    return env[ops[-1]["out"]]


def make_packed_forward(ops: Sequence[Mapping]) -> Callable:
    """``jit(lambda tensors, x: packed_forward(ops, tensors, x))`` for a fixed op list."""
    ops = [dict(op) for op in ops]
    return jax.jit(lambda tensors, x: packed_forward(ops, tensors, x))
