"""The model zoo: MobileNetV2, ResNet-20 and ResNet-18 with binarizable convolutions.

Every model is a Flax linen module called as ``model.apply(variables, x, train=...)`` on NHWC
inputs and returning float32 logits ``[N, num_classes]``. Every conv except the stem is a
:class:`qat_jax.layers.BinaryConv` with a ``block_id``; the stem and the classifier are FP.

* :func:`create_model` builds a model by name (``'mobilenetv2'``, ``'resnet20'``,
  ``'resnet18'``) from its constructor keyword arguments;
* :func:`init_variables` initialises it (``train=False``, init-only collections dropped);
* :func:`quantizable_layers` lists its binary layers (:class:`QLayer`) bottom to top
  (:func:`traced_quantizable_layers`: the same list from the model alone, computing nothing);
* :func:`static_fp` gives the same model with every layer's FP paths compiled in, and nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn

from qat_jax.models.common import (
    BN_MOMENTUM,
    LAYER_KINDS,
    QLayer,
    init_variables,
    quantizable_layers,
    traced_quantizable_layers,
)
from qat_jax.models.mobilenetv2 import MobileNetV2
from qat_jax.models.resnet import ResNet18, ResNet20

__all__ = [
    "BN_MOMENTUM",
    "LAYER_KINDS",
    "MODELS",
    "MobileNetV2",
    "QLayer",
    "ResNet18",
    "ResNet20",
    "create_model",
    "has_option",
    "init_variables",
    "quantizable_layers",
    "static_fp",
    "traced_quantizable_layers",
]

#: Registry: model name -> module class.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenetv2": MobileNetV2,
    "resnet20": ResNet20,
    "resnet18": ResNet18,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """The model registered as ``name`` (case-insensitive), built with ``kwargs``.

    Raises:
      ValueError: unknown ``name`` (the message lists the valid names).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)


def has_option(name: str, option: str) -> bool:
    """Whether the model registered as ``name`` has the constructor argument ``option``."""
    key = name.lower() if isinstance(name, str) else name
    return key in MODELS and option in getattr(MODELS[key], "__dataclass_fields__", {})


def static_fp(model: nn.Module) -> nn.Module:
    """``model`` as its FP network: every binary layer's ``quant.static_fp`` set.

    It reads the same variables and, from variables whose modes are all FP (every ``w_mode`` and
    ``a_mode`` 0, as the FP phase and the KD teacher have them), computes the same function as
    ``model`` (``tests/test_models.py``); it ignores any other mode. Its programs contain no
    switch between a layer's paths, so they compile faster: the train step runs the KD
    teacher's forward pass with it.

    Raises:
      ValueError: ``model`` has no ``quant`` option (not a model of the zoo).
    """
    quant = getattr(model, "quant", None)
    if quant is None or not dataclasses.is_dataclass(quant):
        raise ValueError(f"static_fp needs a zoo model with a `quant` option, got {type(model)}")
    return model.clone(quant=dataclasses.replace(quant, static_fp=True))
