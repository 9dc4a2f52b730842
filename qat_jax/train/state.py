"""The train state and the split of a model's variables into trainable and state collections.

A Flax model's variables are split into

* **trainable** collections (:data:`TRAINABLE`): ``params`` (latent weights, BN, stem, classifier)
  and ``quant`` (thresholds ``tau``, transform ``P`` and ``rho``);
* **state** collections (:data:`STATE`): ``batch_stats``, ``qstate`` (modes), ``calib`` (``V0``,
  ``lam``) and ``binary`` (materialised ``B``, ``alpha``).

The freeze mask has the structure of the trainable tree (float32 0/1 per leaf) and is *data*: the
train step multiplies gradients and updates by it, so a new mask needs no recompilation and no
optimizer rebuild (see :mod:`qat_jax.train.stages`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax

from qat_jax.tree import Path

TRAINABLE = ("params", "quant")
STATE = ("batch_stats", "qstate", "calib", "binary")

__all__ = ["TRAINABLE", "STATE", "Path", "TrainState", "split_variables"]


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes (a pytree; replicated across devices).

    Attributes:
      step: int32 scalar, global step (FP phase and QAT phase counted together).
      params: trainable collections ``{'params': ..., 'quant': ...}``: what the optimizer
        updates (optax's and Flax's ``params``), two collections because thresholds and
        transforms train too. The field keeps this name because checkpoints store the fields by
        name; ``state.variables`` gives the model's variables without the nesting.
      state: non-trainable collections ``{'batch_stats', 'qstate', 'calib', 'binary'}``.
      opt_state: the optax state of ``params``.
      mask: the structure of ``params`` with one float32 0/1 scalar per leaf; 0 freezes the
        leaf bit-exactly.
    """

    step: jax.Array
    params: Any
    state: Any
    opt_state: Any
    mask: Any

    @property
    def variables(self) -> dict:
        return {**self.params, **self.state}


def split_variables(variables: Mapping) -> tuple[dict, dict]:
    """Split model variables into ``(trainable, state)`` dicts (missing collections are empty)."""
    variables = flax.core.unfreeze(variables)
    unknown = set(variables) - set(TRAINABLE) - set(STATE)
    if unknown:
        raise ValueError(f"unexpected variable collections {sorted(unknown)}")
    trainable = {k: variables.get(k, {}) for k in TRAINABLE}
    state = {k: variables.get(k, {}) for k in STATE}
    return trainable, state
