"""Model variables -> the deployable op list of a ``.qat`` file (BN folded, ``B`` bit-packed).

The op list is a straight-line program over named activations (``"x"`` is the input, the last
op's output is the logits). Ops (all NHWC, float32 activations):

=================  ==========================================================================
``conv``           FP conv, BN folded into ``kernel`` (HWIO) and ``bias``; symmetric k//2 pad
``binary_conv``    W1A1 conv: input bit ``x - tau >= 0``; ``dot`` = XNOR-popcount over the
                   packed ``weights`` (padding contributes 0); output ``scale * dot + shift``
                   (``scale = alpha * gamma / sqrt(var + eps)``, ``shift = beta - ...``)
``relu``/``relu6`` elementwise
``rprelu``         ``where(z > 0, z, slope * z) + shift_out``, ``z = x - shift_in`` (per channel;
                   ReActNet's RPReLU, after binary convs of ``reactnet`` models)
``add``            sum of the two inputs (residual)
``shortcut_add``   ``in: [y, x]``: ``y + match(pool(x))``, the real-valued shortcut of a conv
                   (``binary_shortcut`` models): ``pool`` a 2x2 / 2 average (in-image entries,
                   ceil mode) when ``stride`` is 2; ``match`` ``c_in -> c_out`` channels,
                   output ``k`` = mean of inputs ``floor(k c_in / c_out) .. ceil((k+1) c_in /
                   c_out) - 1`` (``match`` names the case; :mod:`qat_jax.shortcut`)
``max_pool``       window/strides/padding, padding is -inf (torch ``MaxPool2d``)
``mean``           global average over H, W -> ``[N, C]``
``dense``          FP ``x @ kernel + bias`` (the classifier)
=================  ==========================================================================

Emitters exist for the model zoo (:class:`~qat_jax.models.MobileNetV2`, the ResNets); they mirror
the models' forward code, and the tests check the packed forward against ``model.apply``. A model
of your own is exported when it has a method ``export_graph(g)`` that emits its forward through
the :class:`GraphBuilder` ``g`` (``conv_bn``, ``act``, ``add``, ``mean``, ``dense``, ...) and
returns the logits' name (examples/custom_model.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import flax.linen as nn
import numpy as np

from qat_jax import experiment
from qat_jax import layers as qlayers
from qat_jax import shortcut as qshortcut
from qat_jax.export.packing import num_words, pack_rows
from qat_jax.models import MobileNetV2
from qat_jax.models.resnet import ResNet
from qat_jax.tree import get_path

__all__ = ["build_graph", "BN_EPSILON", "ExportError", "GraphBuilder"]

#: ``qat_jax.models.common.batch_norm``'s epsilon (PyTorch's default).
BN_EPSILON = 1e-5


class ExportError(ValueError):
    """A model or layer state the exporter cannot represent."""


class _Builder:
    def __init__(self, variables: Mapping, input_channels: int):
        self.v = variables
        self.ops: list[dict] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.channels = {"x": int(input_channels)}
        self.count = 0

    def _new(self, channels: int) -> str:
        self.count += 1
        name = f"t{self.count}"
        self.channels[name] = int(channels)
        return name

    def _tensor(self, name: str, value, dtype) -> str:
        self.tensors[name] = np.ascontiguousarray(np.asarray(value).astype(dtype))
        return name

    def _bn(self, bn_path) -> tuple[np.ndarray, np.ndarray]:
        """``(mul, add)`` of an eval-mode BN in float64: ``bn(y) = mul * y + add``."""
        p = get_path(self.v["params"], bn_path)
        s = get_path(self.v["batch_stats"], bn_path)
        if p is None or s is None:
            raise ExportError(f"missing BatchNorm variables at {'/'.join(bn_path)}")
        mul = np.asarray(p["scale"], np.float64) / np.sqrt(
            np.asarray(s["var"], np.float64) + BN_EPSILON
        )
        add = np.asarray(p["bias"], np.float64) - mul * np.asarray(s["mean"], np.float64)
        return mul, add

    def conv_bn(self, x: str, path, bn_path, strides: int) -> str:
        """A conv (FP or binary, per its modes) followed by its BN, folded."""
        name = "/".join(path)
        params = get_path(self.v["params"], path)
        kernel = np.asarray(params["kernel"], np.float64)
        kh, kw, cin_g, c_out = kernel.shape
        c_in = self.channels[x]
        groups = c_in // cin_g
        mul, add = self._bn(bn_path)
        if "bias" in params:
            add = add + mul * np.asarray(params["bias"], np.float64)
        qs = get_path(self.v.get("qstate", {}), path)
        w_mode = int(np.asarray(qs["w_mode"])) if qs is not None else qlayers.FP
        a_mode = int(np.asarray(qs["a_mode"])) if qs is not None else qlayers.FP_INPUT
        out = self._new(c_out)
        geometry = {
            "kernel_size": [kh, kw],
            "strides": [strides, strides],
            "padding": [[kh // 2, kh // 2], [kw // 2, kw // 2]],
            "groups": groups,
            "c_in": c_in,
            "c_out": c_out,
        }
        if w_mode == qlayers.FP and a_mode == qlayers.FP_INPUT:
            self.ops.append(
                {
                    "op": "conv",
                    "name": name,
                    "in": x,
                    "out": out,
                    **geometry,
                    "kernel": self._tensor(f"{name}/kernel", kernel * mul, np.float32),
                    "bias": self._tensor(f"{name}/bias", add, np.float32),
                }
            )
            return out
        if w_mode == qlayers.FP or a_mode == qlayers.FP_INPUT:
            raise ExportError(
                f"{name}: w_mode={w_mode}, a_mode={a_mode}; export supports layers whose weights "
                "and inputs are both binary (a W1A1 conv) or both FP"
            )
        b, alpha = self._binary_weights(path, params, groups)
        d = b.shape[-1]
        tau = np.asarray(get_path(self.v["quant"], path)["tau"], np.float32)
        alpha = alpha.reshape(c_out).astype(np.float64)
        self.ops.append(
            {
                "op": "binary_conv",
                "name": name,
                "in": x,
                "out": out,
                **geometry,
                "d": int(d),
                "words": num_words(d),
                "weights": self._tensor(f"{name}/B", pack_rows(b.reshape(c_out, d)), np.uint32),
                "tau": self._tensor(f"{name}/tau", tau, np.float32),
                "alpha": self._tensor(f"{name}/alpha", alpha, np.float32),
                "scale": self._tensor(f"{name}/scale", mul * alpha, np.float32),
                "shift": self._tensor(f"{name}/shift", add, np.float32),
            }
        )
        return out

    def _binary_weights(self, path, params, groups) -> tuple[np.ndarray, np.ndarray]:
        qs = get_path(self.v["qstate"], path)
        if int(np.asarray(qs["w_mode"])) == qlayers.FROZEN:
            binary = get_path(self.v["binary"], path)
            return np.asarray(binary["B"], np.int8), np.asarray(binary["alpha"], np.float32)
        # Binarizing mode: the same function the layer's forward uses.
        quant = {k: np.asarray(v) for k, v in get_path(self.v["quant"], path).items()}
        calib = {
            k: np.asarray(v)
            for k, v in (get_path(self.v.get(qlayers.CALIB, {}), path) or {}).items()
        }
        cfg = experiment.variables_quant_config(quant)
        b, alpha, _ = qlayers.layer_binary_weights(params["kernel"], groups, quant, calib, cfg)
        return np.asarray(b).astype(np.int8), np.asarray(alpha, np.float32)

    def act(self, x: str, kind: str, act_path=None, conv_path=None) -> str:
        """``kind`` (relu/relu6), or RPReLU where the model has one at ``act_path`` and the conv
        at ``conv_path`` has a binary input (``ConvActivation`` of :mod:`qat_jax.activations`)."""
        out = self._new(self.channels[x])
        rp = get_path(self.v["params"], (*act_path, "rprelu")) if act_path else None
        qs = get_path(self.v.get("qstate", {}), conv_path) if conv_path else None
        if (
            rp is not None
            and qs is not None
            and int(np.asarray(qs["a_mode"])) == qlayers.BINARY_INPUT
        ):
            name = "/".join(act_path)
            self.ops.append(
                {
                    "op": "rprelu",
                    "name": name,
                    "in": x,
                    "out": out,
                    **{
                        k: self._tensor(f"{name}/{k}", rp[k], np.float32)
                        for k in ("shift_in", "slope", "shift_out")
                    },
                }
            )
        else:
            self.ops.append({"op": kind, "in": x, "out": out})
        return out

    def add(self, a: str, b: str) -> str:
        out = self._new(self.channels[a])
        self.ops.append({"op": "add", "in": [a, b], "out": out})
        return out

    def shortcut_add(self, y: str, x: str, stride: int) -> str:
        """``y + shortcut(x)``: the matched real-valued input ``x`` of the conv that gave ``y``."""
        c_in, c_out = self.channels[x], self.channels[y]
        out = self._new(c_out)
        self.ops.append(
            {
                "op": "shortcut_add",
                "in": [y, x],
                "out": out,
                "stride": [int(stride), int(stride)],
                "c_in": c_in,
                "c_out": c_out,
                "match": qshortcut.match_kind(c_in, c_out),
            }
        )
        return out

    def max_pool(self, x: str) -> str:
        out = self._new(self.channels[x])
        self.ops.append(
            {
                "op": "max_pool",
                "in": x,
                "out": out,
                "window": [3, 3],
                "strides": [2, 2],
                "padding": [[1, 1], [1, 1]],
            }
        )
        return out

    def mean(self, x: str) -> str:
        out = self._new(self.channels[x])
        self.ops.append({"op": "mean", "in": x, "out": out})
        return out

    def dense(self, x: str, path) -> str:
        p = get_path(self.v["params"], path)
        kernel = np.asarray(p["kernel"], np.float32)
        bias = np.asarray(p.get("bias", np.zeros(kernel.shape[1])), np.float32)
        out = self._new(kernel.shape[1])
        name = "/".join(path)
        self.ops.append(
            {
                "op": "dense",
                "name": name,
                "in": x,
                "out": out,
                "kernel": self._tensor(f"{name}/kernel", kernel, np.float32),
                "bias": self._tensor(f"{name}/bias", bias, np.float32),
            }
        )
        return out


#: The op-list builder a model's ``export_graph(g)`` receives: every method takes and returns the
#: names of activations (``"x"`` is the input); layers are named by their variable paths.
GraphBuilder = _Builder


def _mobilenetv2(model: MobileNetV2, b: _Builder) -> str:
    def conv_bn(x, path, bn_path, stride):
        y = b.conv_bn(x, path, bn_path, stride)
        return b.shortcut_add(y, x, stride) if model.binary_shortcut else y

    stem_stride = 2 if model.variant == "imagenet" else 1
    x = b.act(b.conv_bn("x", ("stem",), ("stem_bn",), stem_stride), "relu6")
    block = 0
    for t, _, n, s in model.stages():
        for i in range(n):
            blk = f"block{block}"
            stride = s if i == 0 else 1
            y = x
            if t != 1:
                y = conv_bn(y, (blk, "expand"), (blk, "expand_bn"), 1)
                y = b.act(y, "relu6", (blk, "expand_act"), (blk, "expand"))
            y = conv_bn(y, (blk, "depthwise"), (blk, "depthwise_bn"), stride)
            y = b.act(y, "relu6", (blk, "depthwise_act"), (blk, "depthwise"))
            y = conv_bn(y, (blk, "project"), (blk, "project_bn"), 1)
            if stride == 1 and b.channels[x] == b.channels[y]:
                y = b.add(y, x)
            x = y
            block += 1
    x = b.act(conv_bn(x, ("head_conv",), ("head_bn",), 1), "relu6", ("head_act",), ("head_conv",))
    return b.dense(b.mean(x), ("classifier",))


def _resnet(model: ResNet, b: _Builder) -> str:
    if model.act is not nn.relu:
        raise ExportError("ResNet export supports act=nn.relu only")
    imagenet = model.stem == "imagenet"
    x = b.act(b.conv_bn("x", ("stem",), ("stem_bn",), 2 if imagenet else 1), "relu")
    if imagenet:
        x = b.max_pool(x)
    block = 0
    for n, _, stride in zip(model.stage_sizes, model.widths, model.stage_strides, strict=True):
        for i in range(int(n)):
            blk = f"block{block}"
            s = int(stride) if i == 0 else 1
            y = b.conv_bn(x, (blk, "conv1"), (blk, "bn1"), s)
            y = b.act(y, "relu", (blk, "act1"), (blk, "conv1"))
            y = b.conv_bn(y, (blk, "conv2"), (blk, "bn2"), 1)
            shortcut = x
            if get_path(b.v["params"], (blk, "shortcut")) is not None:
                shortcut = b.conv_bn(x, (blk, "shortcut"), (blk, "shortcut_bn"), s)
            x = b.act(b.add(y, shortcut), "relu", (blk, "act2"), (blk, "conv2"))
            block += 1
    return b.dense(b.mean(x), ("classifier",))


def build_graph(
    model: nn.Module, variables: Mapping, input_channels: int
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """``(ops, tensors)`` of the deployable network of ``model`` with ``variables``.

    Binary layers (weights and inputs binary) become ``binary_conv`` with ``B`` packed 1 bit per
    weight; FP layers become ``conv``/``dense``; every BN is folded into the conv before it. No
    latent weight and no transform variable is read (except for a layer still in binarizing mode,
    whose ``B`` is materialised here with the layer's own function).

    Raises:
      ExportError: an unsupported model class (neither of the zoo nor with an
        ``export_graph(g)`` method) or layer state.
    """
    variables = flax.core.unfreeze(variables)
    b = _Builder(variables, input_channels)
    if isinstance(model, MobileNetV2):
        _mobilenetv2(model, b)
    elif isinstance(model, ResNet):
        _resnet(model, b)
    elif callable(getattr(model, "export_graph", None)):
        model.export_graph(b)  # a user-defined model (examples/custom_model.py)
    else:
        raise ExportError(f"no exporter for {type(model).__name__}")
    return b.ops, b.tensors
