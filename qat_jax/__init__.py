"""qat_jax: BiTAT binarization (1-bit weights, 1-bit activations) for JAX/Flax.

The public namespace is small on purpose:

* quantizers: :func:`ste_sign`, :func:`approx_sign`, :func:`rsign`, :func:`xnor_binarize`;
* the transform: :func:`cayley`, :func:`pca_init`, :func:`correlation`;
* the binarizer: :func:`importance_binarize` returning ``(B, alpha)``;
* layers: :class:`BinaryConv`, :class:`BinaryDense`, :class:`QuantConfig` and the mode constants (``w_mode``: :data:`FP`, :data:`BINARIZING`,
  :data:`FROZEN`; ``a_mode``: :data:`FP_INPUT`, :data:`BINARY_INPUT`);
* ``qat_jax.models``: ``MobileNetV2``, ``ResNet20``, ``ResNet18``.
"""

from qat_jax import models
from qat_jax.binarize import importance_binarize
from qat_jax.layers import (
    BINARIZING,
    BINARY_INPUT,
    FP,
    FP_INPUT,
    FROZEN,
    BinaryConv,
    BinaryDense,
    QuantConfig,
)
from qat_jax.quantizers import approx_sign, rsign, ste_sign, xnor_binarize
from qat_jax.transform import cayley, correlation, pca_init

__version__ = "0.1.0"

__all__ = [
    "BINARIZING",
    "BINARY_INPUT",
    "FP",
    "FP_INPUT",
    "FROZEN",
    "BinaryConv",
    "BinaryDense",
    "QuantConfig",
    "approx_sign",
    "cayley",
    "correlation",
    "importance_binarize",
    "models",
    "pca_init",
    "rsign",
    "ste_sign",
    "xnor_binarize",
]
