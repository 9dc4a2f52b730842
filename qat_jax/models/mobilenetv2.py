"""MobileNetV2 (torchvision layout) with binarizable convolutions.

Layout (``variant='imagenet'``, exactly torchvision's ``mobilenet_v2``)::

  stem      Conv 3x3 / 2 -> 32*w, BN, ReLU6                       (FP, not quantizable)
  block{i}  inverted residual, i = 0 .. 16 (stages (t, c, n, s) below)
              expand     BinaryConv 1x1 C_in -> round(C_in * t), BN, ReLU6   (absent when t = 1)
              depthwise  BinaryConv 3x3 / s, groups = hidden, BN, ReLU6
              project    BinaryConv 1x1 hidden -> c, BN (linear)
              + input when s = 1 and C_in = c
  head_conv BinaryConv 1x1 -> last_channel, BN (head_bn), ReLU6   (its own block)
  global average pool, dropout, classifier Dense(num_classes)    (FP, not quantizable)

Default stages ``(t, c, n, s)``: (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1),
(6,160,3,2), (6,320,1,1); channels ``c`` are scaled by ``width_mult`` and rounded to multiples of
8, ``last_channel = _make_divisible(1280 * max(1, width_mult), 8)``.

``variant='cifar'`` (32x32 inputs): stem stride 1 and stage strides (1, 1, 2, 2, 1, 2, 1), i.e. a
total down-sampling of 8 instead of 32.

``binary_shortcut=True`` (Bi-Real Net / ReActNet): every binary conv (expand, depthwise, project,
head_conv) gets a parameter-free real-valued shortcut, ``BN(conv(x)) + match(x)`` before its
activation, ``match`` being a channel repeat (expand), a 2x2 average pool (stride-2 depthwise) or a
mean over groups of consecutive channels (project); the rules are in :mod:`qat_jax.shortcut`. The
block's own residual (``+ input``) stays. Same parameters and variables as without it.

Module names and block ids: block ``i`` (``block{i}``, ``i`` counting every inverted residual
bottom to top, 17 with the default stages) has ``block_id = i`` for its ``expand``,
``depthwise`` and ``project`` convs (BNs: ``expand_bn``, ``depthwise_bn``, ``project_bn``);
``head_conv`` has ``block_id = number of blocks``. Stem: ``stem``/``stem_bn``; classifier:
``classifier``. The torchvision names map as ``features.0`` -> ``stem``, ``features.{i+1}`` ->
``block{i}``, ``features.18`` -> ``head_conv``, ``classifier.1`` -> ``classifier``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qat_jax.activations import ConvActivation, conv_a_mode
from qat_jax.layers import BinaryConv, QuantConfig
from qat_jax.models.common import Conv, _make_divisible, batch_norm
from qat_jax.shortcut import shortcut

__all__ = ["MobileNetV2", "InvertedResidual", "IMAGENET_SETTING", "CIFAR_STRIDES"]

Dtype = Any

#: torchvision's ``(t, c, n, s)`` per stage.
IMAGENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
#: Stage strides of the CIFAR variant (the stem has stride 1 too).
CIFAR_STRIDES: tuple[int, ...] = (1, 1, 2, 2, 1, 2, 1)

_VARIANTS = ("imagenet", "cifar")
_ROUND = 8


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [expand 1x1 ->] depthwise 3x3 -> project 1x1 (+ identity).

    Attributes:
      features: output channels.
      strides: stride of the depthwise conv (1 or 2).
      expand_ratio: ``t``; the hidden width is ``round(C_in * t)`` and ``t == 1`` has no expand.
      block_id: block id of all three convs.
      act: activation after expand and depthwise (ReLU6).
      rprelu: RPReLU instead of ``act`` after convs whose input is binary (``reactnet``).
      binary_shortcut: add each conv's matched real-valued input to its BN output, before the
        activation (:mod:`qat_jax.shortcut`); ``False`` computes exactly the plain block.
    """

    features: int
    strides: int
    expand_ratio: int
    block_id: int
    quant: QuantConfig = QuantConfig()
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    act: Callable = nn.relu6
    rprelu: bool = False
    binary_shortcut: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``x``: ``[N, H, W, C_in]`` -> ``[N, ceil(H / s), ceil(W / s), features]``."""
        c_in = x.shape[-1]
        hidden = int(round(c_in * self.expand_ratio))
        conv = dict(
            block_id=self.block_id, quant=self.quant, conv_impl=self.conv_impl, dtype=self.dtype
        )

        def bn(name):
            return batch_norm(train, self.bn_axis_name, self.dtype, name)

        def act(name, y, conv_module):
            return ConvActivation(self.act, self.rprelu, name=name)(y, conv_a_mode(conv_module))

        def conv_bn(conv_module, bn_name, z, stride=1):
            out = bn(bn_name)(conv_module(z))
            if self.binary_shortcut:
                out = out + shortcut(z, conv_module.features, stride).astype(out.dtype)
            return out

        y = x
        if self.expand_ratio != 1:
            expand = BinaryConv(hidden, (1, 1), name="expand", **conv)
            y = act("expand_act", conv_bn(expand, "expand_bn", y), expand)
        depthwise = BinaryConv(
            hidden,
            (3, 3),
            (self.strides, self.strides),
            feature_group_count=hidden,
            name="depthwise",
            **conv,
        )
        y = act("depthwise_act", conv_bn(depthwise, "depthwise_bn", y, self.strides), depthwise)
        project = BinaryConv(self.features, (1, 1), name="project", **conv)
        y = conv_bn(project, "project_bn", y)
        if self.strides == 1 and c_in == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 with binarizable convs (see the module docstring for the layout and names).

    Attributes:
      num_classes: classifier outputs.
      width_mult: channel multiplier (stem, stages, and ``last_channel`` when > 1).
      variant: ``'imagenet'`` (torchvision, 224x224 inputs) or ``'cifar'`` (stem stride 1, stage
        strides (1, 1, 2, 2, 1, 2, 1); 32x32 inputs).
      dropout_rate: dropout before the classifier (rng stream ``'dropout'`` in train mode).
      quant: static options of every binary layer.
      conv_impl: ``'auto'``, ``'xla'``, ``'cpu'`` or ``'cpu_ffi'`` for every conv.
      dtype: compute dtype (parameters and BN statistics stay float32; logits are float32).
      bn_axis_name: axis name for synchronised BN under ``pmap`` (``None``: local statistics).
      inverted_residual_setting: ``(t, c, n, s)`` rows replacing the default stages (reduced-depth
        models); their strides are used as given, whatever the variant (the variant still sets the
        stem stride).
      last_channel: output channels of ``head_conv``, used as given (not scaled); ``None``: the
        torchvision rule ``_make_divisible(1280 * max(1, width_mult), 8)``.
      round_nearest: channel rounding multiple (torchvision's 8).
      rprelu: RPReLU instead of ReLU6 after every binary conv once its input is binary (the
        ``reactnet`` method; see :mod:`qat_jax.activations`). ``False`` adds no variables.
      binary_shortcut: a real-valued shortcut around every binary conv (Bi-Real Net / ReActNet;
        :mod:`qat_jax.shortcut`); no parameters, ``False`` is the plain MobileNetV2.
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    variant: str = "imagenet"
    dropout_rate: float = 0.2
    quant: QuantConfig = QuantConfig()
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    inverted_residual_setting: Sequence[tuple[int, int, int, int]] | None = None
    last_channel: int | None = None
    round_nearest: int = _ROUND
    rprelu: bool = False
    binary_shortcut: bool = False

    def stages(self) -> tuple[tuple[int, int, int, int], ...]:
        """The ``(t, c, n, s)`` stages actually built (before width scaling of ``c``)."""
        if self.variant not in _VARIANTS:
            raise ValueError(
                f"MobileNetV2 variant must be one of {_VARIANTS}, got {self.variant!r}"
            )
        if self.inverted_residual_setting is not None:
            rows = tuple(tuple(int(v) for v in row) for row in self.inverted_residual_setting)
            if not rows or any(len(row) != 4 for row in rows):
                raise ValueError(
                    "inverted_residual_setting must be a non-empty sequence of (t, c, n, s) rows, "
                    f"got {self.inverted_residual_setting!r}"
                )
            return rows
        if self.variant == "cifar":
            return tuple(
                (t, c, n, s)
                for (t, c, n, _), s in zip(IMAGENET_SETTING, CIFAR_STRIDES, strict=True)
            )
        return IMAGENET_SETTING

    def num_blocks(self) -> int:
        """Number of inverted-residual blocks (``head_conv`` has this block id)."""
        return sum(n for _, _, n, _ in self.stages())

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``x``: ``[N, H, W, C]`` (any ``C``) -> logits ``[N, num_classes]`` float32."""
        stages = self.stages()
        stem_stride = 2 if self.variant == "imagenet" else 1
        input_channel = _make_divisible(32 * self.width_mult, self.round_nearest)
        last_channel = (
            int(self.last_channel)
            if self.last_channel is not None
            else _make_divisible(1280 * max(1.0, self.width_mult), self.round_nearest)
        )

        x = Conv(
            input_channel,
            (3, 3),
            (stem_stride, stem_stride),
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="stem",
        )(x)
        x = nn.relu6(batch_norm(train, self.bn_axis_name, self.dtype, "stem_bn")(x))

        block_id = 0
        for t, c, n, s in stages:
            features = _make_divisible(c * self.width_mult, self.round_nearest)
            for i in range(n):
                x = InvertedResidual(
                    features=features,
                    strides=s if i == 0 else 1,
                    expand_ratio=t,
                    block_id=block_id,
                    quant=self.quant,
                    conv_impl=self.conv_impl,
                    dtype=self.dtype,
                    bn_axis_name=self.bn_axis_name,
                    rprelu=self.rprelu,
                    binary_shortcut=self.binary_shortcut,
                    name=f"block{block_id}",
                )(x, train)
                block_id += 1

        head = BinaryConv(
            last_channel,
            (1, 1),
            block_id=block_id,
            quant=self.quant,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="head_conv",
        )
        y = batch_norm(train, self.bn_axis_name, self.dtype, "head_bn")(head(x))
        if self.binary_shortcut:
            y = y + shortcut(x, last_channel, 1).astype(y.dtype)
        x = ConvActivation(nn.relu6, self.rprelu, name="head_act")(y, conv_a_mode(head))

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            name="classifier",
        )(x)
        return x.astype(jnp.float32)
