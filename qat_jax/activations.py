"""Activations after a binary conv: the FP activation, or ReActNet's RPReLU once the conv is binary.

ReActNet (Liu et al., 2020) replaces the ReLU after each binary conv by **RPReLU**, a PReLU with
learnable per-channel shifts before and after it::

    RPReLU(x) = PReLU_beta(x - gamma) + zeta,    PReLU_beta(z) = z if z > 0 else beta * z

(``gamma``: ``shift_in``, ``zeta``: ``shift_out``, ``beta``: ``slope``, per channel).

:class:`ConvActivation` is what the models put after a binarizable conv's BatchNorm. Without
``rprelu`` it is just the model's FP activation (ReLU6/ReLU) and has no variables. With ``rprelu``
it computes the FP activation while the conv's ``a_mode`` is ``FP_INPUT`` and RPReLU once the conv
binarizes its input (``a_mode == BINARY_INPUT``, constants of :mod:`qat_jax.layers`). The switch is data, like every mode in qat_jax, so the FP
teacher (all modes 0) and the binary student share one module and one compiled step, and a model
built with ``rprelu`` is exactly the FP model until its first binary stage.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from qat_jax.layers import BINARY_INPUT, FP_INPUT

__all__ = ["RPReLU", "ConvActivation", "conv_a_mode", "rprelu"]


def rprelu(x: jax.Array, shift_in: jax.Array, slope: jax.Array, shift_out: jax.Array) -> jax.Array:
    """``PReLU_slope(x - shift_in) + shift_out`` with per-channel (last axis) parameters."""
    z = x - shift_in.astype(x.dtype)
    return jnp.where(z > 0, z, slope.astype(x.dtype) * z) + shift_out.astype(x.dtype)


class RPReLU(nn.Module):
    """ReActNet's RPReLU over the last axis; parameters in ``params`` (float32).

    Attributes:
      slope_init: initial negative slope ``beta`` (PReLU's 0.25, as in ReActNet).
    """

    slope_init: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        shift_in = self.param("shift_in", nn.initializers.zeros, (c,), jnp.float32)
        slope = self.param("slope", nn.initializers.constant(self.slope_init), (c,), jnp.float32)
        shift_out = self.param("shift_out", nn.initializers.zeros, (c,), jnp.float32)
        return rprelu(x, shift_in, slope, shift_out)


class ConvActivation(nn.Module):
    """``fp_act(x)``, or (``rprelu=True``) RPReLU where the producing conv binarizes its input.

    Attributes:
      fp_act: the model's FP activation (e.g. ``nn.relu6``).
      rprelu: use RPReLU after binary convs (the ``reactnet`` method); ``False`` adds no variables.
    """

    fp_act: Callable = nn.relu6
    rprelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, a_mode: jax.Array) -> jax.Array:
        if not self.rprelu:
            return self.fp_act(x)
        return jnp.where(
            jnp.asarray(a_mode) == BINARY_INPUT, RPReLU(name="rprelu")(x), self.fp_act(x)
        )


def conv_a_mode(conv: nn.Module) -> jax.Array:
    """The ``a_mode`` of a bound binary conv that has been called (``FP_INPUT`` before its
    variables exist, and always with ``quant.static_fp``)."""
    if conv.quant.static_fp:  # a constant: XLA keeps only the FP activation
        return jnp.asarray(FP_INPUT, jnp.int32)
    qstate = conv.variables.get("qstate", {})
    return qstate.get("a_mode", jnp.asarray(FP_INPUT, jnp.int32))
