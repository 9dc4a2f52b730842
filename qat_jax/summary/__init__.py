"""A Larq-style model summary: per-layer precision, parameters, memory and MACs, and totals.

``python -m qat_jax.summary --workdir=DIR`` (a run's final checkpoint) or
``python -m qat_jax.summary --config=configs/default.py`` (the configured model, every quantizable
layer counted as it is deployed by the config's method): the CLI is
:mod:`qat_jax.summary.__main__`; this module is the library (no checkpoint, config or data code).
The trainer prints the same table at the end of a run and writes it to
``<workdir>/model_summary.txt``.

Conventions (per example, i.e. batch 1):

* **params**: conv/dense kernels and biases, BN ``scale`` and ``bias`` (as torch counts them; the
  running statistics are not parameters);
* **memory** of a layer at its bit width: a binary layer stores 1 bit per kernel weight plus its
  per-output-channel scale ``alpha`` and per-input-channel threshold ``tau`` as float32; every
  other parameter is float32. A BN costs 2 float32 per channel (deployed folded into a
  per-channel scale and shift);
* other modules with parameters of their own (e.g. RPReLU) are FP rows without MACs;
* **MACs**: ``Ho * Wo * C_out * kh * kw * C_in / groups`` for a conv, ``d_in * d_out`` for a dense
  layer; a binary layer (binary weights *and* inputs) counts them as binary MACs (BOPs), every other
  layer as FP MACs (FLOPs). BN, activations, pooling and adds are not counted (Larq's convention),
  and neither are the real-valued shortcuts of ``binary_shortcut`` models (adds, 2x2 average
  pools, channel repeats and means: no parameters, no MACs);
* **totals**: FP32 size = 4 bytes x all params; packed size = the sum of the memory column;
  compression = FP32 size / packed size; **OPs = BOPs / 64 + FLOPs** (Bi-Real/ReActNet).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qat_jax import layers as qlayers
from qat_jax.models.batchnorm import BatchNorm
from qat_jax.models.common import Conv
from qat_jax.tree import get_path

#: The zoo's BatchNorm and Flax's (a model of the user's own).
_BATCH_NORMS = (BatchNorm, nn.BatchNorm)

__all__ = ["LayerRow", "ModelSummary", "model_summary", "format_summary"]

_BINARY_MODES = ("modes", "all", "none")


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One row of the table (see the module docstring for the conventions)."""

    name: str
    kind: str
    binary: bool
    params: int
    memory_bits: int
    binary_macs: int
    fp_macs: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    rows: tuple[LayerRow, ...]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def binary_params(self) -> int:
        return sum(r.params for r in self.rows if r.binary)

    @property
    def fp32_bytes(self) -> float:
        return 4.0 * self.params

    @property
    def packed_bytes(self) -> float:
        return sum(r.memory_bits for r in self.rows) / 8.0

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.packed_bytes

    @property
    def bops(self) -> int:
        return sum(r.binary_macs for r in self.rows)

    @property
    def flops(self) -> int:
        return sum(r.fp_macs for r in self.rows)

    @property
    def ops(self) -> float:
        return self.bops / 64.0 + self.flops

    def totals(self) -> dict:
        return {
            "params": self.params,
            "binary_params": self.binary_params,
            "fp_params": self.params - self.binary_params,
            "fp32_bytes": self.fp32_bytes,
            "packed_bytes": self.packed_bytes,
            "compression": self.compression,
            "binary_macs": self.bops,
            "fp_macs": self.flops,
            "ops": self.ops,
        }

    def to_dict(self) -> dict:
        return {"layers": [dataclasses.asdict(r) for r in self.rows], "totals": self.totals()}


def _size(x) -> int:
    return int(np.prod(x.shape)) if x is not None else 0


def _is_binary(variables, path, binary) -> tuple[bool, bool]:
    """``(weights binary, inputs binary)`` of a quantizable layer."""
    if not isinstance(binary, str):
        return (path in binary,) * 2
    if binary == "all":
        return True, True
    if binary == "none":
        return False, False
    qs = get_path(variables.get("qstate", {}), path)
    if qs is None:
        return False, False
    w = int(np.asarray(qs["w_mode"])) != qlayers.FP
    return w, w and int(np.asarray(qs["a_mode"])) == qlayers.BINARY_INPUT


def model_summary(
    model: nn.Module,
    variables: Mapping,
    input_shape: tuple[int, ...],
    binary: str | Collection[tuple[str, ...]] = "modes",
) -> ModelSummary:
    """The per-layer table of ``model`` on one ``input_shape`` (``(H, W, C)``) example.

    Args:
      model: any model of the zoo (or any module built from ``Conv``/``BinaryConv``/
        ``BinaryDense``/``nn.Dense``/a BatchNorm, called as ``apply(v, x, train=False)``).
      variables: its variables (concrete, or ``jax.ShapeDtypeStruct`` leaves when ``binary`` is
        not ``'modes'``).
      binary: ``'modes'``: a quantizable layer is binary when its ``qstate/w_mode`` is not FP
        (a trained checkpoint); ``'all'``: every quantizable layer is binary (the deployed W1A1
        model); ``'none'``: everything FP; a collection of layer paths: those layers (weights and
        inputs) are binary and every other quantizable layer is FP (what a config binarizes,
        :func:`qat_jax.experiment.binary_layers`).
    """
    if not isinstance(binary, str):
        binary = frozenset(tuple(p) for p in binary)
    elif binary not in _BINARY_MODES:
        raise ValueError(f"binary must be one of {_BINARY_MODES}, got {binary!r}")
    variables = flax.core.unfreeze(variables)
    records: list[tuple[nn.Module, tuple, tuple]] = []
    tracked = (Conv, qlayers.BinaryConv, qlayers.BinaryDense, nn.Dense) + _BATCH_NORMS

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and args and hasattr(args[0], "shape"):
            records.append((context.module, tuple(args[0].shape), tuple(out.shape)))
        return out

    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.result_type(a.dtype)), variables
    )
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, z: model.apply(v, z, train=False), shapes, x)

    rows = []
    for module, in_shape, out_shape in records:
        path = tuple(module.path)
        name = "/".join(path)
        p = get_path(variables["params"], path) or {}
        n_params = sum(_size(v) for v in p.values() if not isinstance(v, Mapping))
        if not isinstance(module, tracked):
            # Any other module with parameters of its own (e.g. RPReLU): FP, no MACs counted.
            if n_params:
                kind = type(module).__name__.lower()
                rows.append(LayerRow(name, kind, False, n_params, 32 * n_params, 0, 0))
            continue
        if isinstance(module, _BATCH_NORMS):
            rows.append(LayerRow(name, "batchnorm", False, n_params, 32 * n_params, 0, 0))
            continue
        kernel = p["kernel"]
        if len(kernel.shape) == 4:
            kh, kw, cin_g, c_out = kernel.shape
            c_in = in_shape[-1]
            groups = c_in // cin_g
            macs = int(np.prod(out_shape[1:3])) * c_out * kh * kw * cin_g
            kind = "depthwise" if groups == c_in and groups > 1 else "conv"
            kind = f"{kind} {kh}x{kw}" + (f"/{module.strides[0]}" if module.strides[0] > 1 else "")
        else:
            c_in, c_out = kernel.shape
            macs = int(np.prod(in_shape[:-1])) * c_in * c_out
            kind = "dense"
        quantizable = isinstance(module, qlayers.BinaryConv | qlayers.BinaryDense)
        w_bin, a_bin = _is_binary(variables, path, binary) if quantizable else (False, False)
        if w_bin:
            k = _size(kernel)
            extra = n_params - k  # a bias stays FP
            memory = k + 32 * (extra + c_out + c_in)  # B, bias, alpha, tau
        else:
            memory = 32 * n_params
        binary_macs = macs if (w_bin and a_bin) else 0
        rows.append(LayerRow(name, kind, w_bin, n_params, memory, binary_macs, macs - binary_macs))
    return ModelSummary(tuple(rows))


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.2f}{unit}"


def format_summary(s: ModelSummary, title: str = "model summary") -> str:
    """The table as text (one line per layer, then the totals)."""
    head = ("layer", "kind", "prec", "params", "memory", "binary MACs", "FP MACs")
    body = [
        (
            r.name,
            r.kind,
            "1-bit" if r.binary else "fp32",
            f"{r.params:,}",
            _human(r.memory_bits / 8, "B"),
            f"{r.binary_macs:,}",
            f"{r.fp_macs:,}",
        )
        for r in s.rows
    ]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]

    def line(row):
        return "  ".join(
            str(c).ljust(w) if i < 3 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    sep = "-" * len(line(head))
    t = s.totals()
    lines = [f"== {title} ==", line(head), sep, *map(line, body), sep]
    lines += [
        f"params: {t['params']:,} ({t['binary_params']:,} binary, {t['fp_params']:,} FP)",
        f"size: FP32 {_human(t['fp32_bytes'], 'B')} ({t['fp32_bytes']:,.0f} bytes) -> "
        f"packed {_human(t['packed_bytes'], 'B')} ({t['packed_bytes']:,.0f} bytes), "
        f"compression {t['compression']:.2f}x",
        f"MACs: {t['binary_macs']:,} binary (BOPs), {t['fp_macs']:,} FP (FLOPs); "
        f"OPs = BOPs/64 + FLOPs = {t['ops']:,.0f}",
    ]
    return "\n".join(lines)
