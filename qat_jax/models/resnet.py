"""ResNet-20 (CIFAR) and ResNet-18 (torchvision) with binarizable convolutions.

Both are stacks of BasicBlocks::

  block{i}   conv1  BinaryConv 3x3 / s, BN (bn1), act
             conv2  BinaryConv 3x3,     BN (bn2)
             + shortcut: identity, or (on a stride or width change) ``shortcut`` BinaryConv
               1x1 / s + BN (``shortcut_bn``) -- option B / torchvision's ``downsample``
             act

``block{i}`` counts the BasicBlocks bottom to top over all stages and is the ``block_id`` of its
``conv1``, ``conv2`` and ``shortcut``. The stem conv (``stem``, ``stem_bn``) and the classifier
(``classifier``) are FP and not quantizable.

* :class:`ResNet20`: 3x3 stem -> 16, stages of 3 blocks with 16/32/64 channels and strides
  1/2/2, global average pool, Dense. 32x32 inputs.
* :class:`ResNet18`: torchvision's ``resnet18`` (7x7/2 stem -> 64, BN, ReLU, 3x3/2 max pool with
  padding 1, stages of 2 blocks with 64/128/256/512 channels and strides 1/2/2/2, average pool,
  ``fc``); 11,689,512 parameters for 1000 classes. torchvision names map as
  ``conv1``/``bn1`` -> ``stem``/``stem_bn``, ``layer{s}.{j}`` -> ``block{2 (s - 1) + j}``,
  ``downsample.0``/``downsample.1`` -> ``shortcut``/``shortcut_bn``, ``fc`` -> ``classifier``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qat_jax.activations import ConvActivation, conv_a_mode
from qat_jax.layers import BinaryConv, QuantConfig
from qat_jax.models.common import Conv, batch_norm, torch_linear_init

__all__ = ["BasicBlock", "ResNet", "ResNet20", "ResNet18"]

Dtype = Any

_STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Two 3x3 binary convs with a residual; 1x1 conv + BN shortcut when the shape changes.

    Attributes:
      features: output channels.
      strides: stride of ``conv1`` and of the shortcut conv.
      block_id: block id of every conv in the block.
      act: activation (ReLU by default).
      rprelu: RPReLU instead of ``act`` after convs whose input is binary (``reactnet``).
    """

    features: int
    strides: int = 1
    block_id: int = 0
    quant: QuantConfig = QuantConfig()
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    act: Callable = nn.relu
    rprelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``x``: ``[N, H, W, C_in]`` -> ``[N, ceil(H / s), ceil(W / s), features]``."""
        conv = dict(
            block_id=self.block_id, quant=self.quant, conv_impl=self.conv_impl, dtype=self.dtype
        )
        s = (self.strides, self.strides)

        def bn(name):
            return batch_norm(train, self.bn_axis_name, self.dtype, name)

        conv1 = BinaryConv(self.features, (3, 3), s, name="conv1", **conv)
        y = ConvActivation(self.act, self.rprelu, name="act1")(
            bn("bn1")(conv1(x)), conv_a_mode(conv1)
        )
        conv2 = BinaryConv(self.features, (3, 3), name="conv2", **conv)
        y = bn("bn2")(conv2(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = BinaryConv(self.features, (1, 1), s, name="shortcut", **conv)(x)
            x = bn("shortcut_bn")(x)
        return ConvActivation(self.act, self.rprelu, name="act2")(y + x, conv_a_mode(conv2))


class ResNet(nn.Module):
    """A BasicBlock ResNet (see the module docstring for the layout and names).

    Attributes:
      stage_sizes: blocks per stage.
      widths: channels per stage.
      stage_strides: stride of the first block of each stage.
      stem: ``'cifar'`` (3x3 conv, stride 1, ``widths[0]`` channels) or ``'imagenet'`` (7x7 conv,
        stride 2, 64 channels, then 3x3 / 2 max pool).
      num_classes: classifier outputs.
      quant: static options of every binary layer.
      conv_impl: ``'auto'``, ``'xla'``, ``'cpu'`` or ``'cpu_ffi'`` for every conv.
      dtype: compute dtype (parameters and BN statistics stay float32; logits are float32).
      bn_axis_name: axis name for synchronised BN under ``pmap`` (``None``: local statistics).
      act: activation after the stem and in every block.
      rprelu: RPReLU instead of ``act`` after binary convs once their input is binary
        (``reactnet``; see :mod:`qat_jax.activations`).
    """

    stage_sizes: Sequence[int] = (3, 3, 3)
    widths: Sequence[int] = (16, 32, 64)
    stage_strides: Sequence[int] = (1, 2, 2)
    stem: str = "cifar"
    num_classes: int = 10
    quant: QuantConfig = QuantConfig()
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    act: Callable = nn.relu
    rprelu: bool = False

    def num_blocks(self) -> int:
        """Number of BasicBlocks (= number of block ids)."""
        return sum(int(n) for n in self.stage_sizes)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``x``: ``[N, H, W, C]`` (any ``C``) -> logits ``[N, num_classes]`` float32."""
        if self.stem not in _STEMS:
            raise ValueError(f"ResNet stem must be one of {_STEMS}, got {self.stem!r}")
        if not len(self.stage_sizes) == len(self.widths) == len(self.stage_strides):
            raise ValueError("stage_sizes, widths and stage_strides must have the same length")
        if self.stem == "imagenet":
            features, kernel, stride = 64, (7, 7), (2, 2)
        else:
            features, kernel, stride = int(self.widths[0]), (3, 3), (1, 1)
        x = Conv(features, kernel, stride, conv_impl=self.conv_impl, dtype=self.dtype, name="stem")(
            x
        )
        x = self.act(batch_norm(train, self.bn_axis_name, self.dtype, "stem_bn")(x))
        if self.stem == "imagenet":
            # torch MaxPool2d(3, 2, padding=1): the padding is -inf (reduce_window's init value).
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        block_id = 0
        for n, width, stride in zip(self.stage_sizes, self.widths, self.stage_strides, strict=True):
            for i in range(int(n)):
                x = BasicBlock(
                    features=int(width),
                    strides=int(stride) if i == 0 else 1,
                    block_id=block_id,
                    quant=self.quant,
                    conv_impl=self.conv_impl,
                    dtype=self.dtype,
                    bn_axis_name=self.bn_axis_name,
                    act=self.act,
                    rprelu=self.rprelu,
                    name=f"block{block_id}",
                )(x, train)
                block_id += 1

        x = jnp.mean(x, axis=(1, 2))
        kernel_init, bias_init = torch_linear_init(x.shape[-1])
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            name="classifier",
        )(x)
        return x.astype(jnp.float32)


class ResNet20(ResNet):
    """CIFAR ResNet-20 with option-B (1x1 conv + BN) shortcuts; 272,474 params at 10 classes."""

    stage_sizes: Sequence[int] = (3, 3, 3)
    widths: Sequence[int] = (16, 32, 64)
    stage_strides: Sequence[int] = (1, 2, 2)
    stem: str = "cifar"
    num_classes: int = 10


class ResNet18(ResNet):
    """torchvision's ResNet-18; 11,689,512 params at 1000 classes."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    stem: str = "imagenet"
    num_classes: int = 1000
