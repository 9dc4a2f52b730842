"""The train state and helpers to address the variables of one layer by path.

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
import jax.numpy as jnp

TRAINABLE = ("params", "quant")
STATE = ("batch_stats", "qstate", "calib", "binary")

Path = tuple[str, ...]


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes (a pytree; replicated across devices).

    Attributes:
      step: int32 scalar, global step (FP phase and QAT phase counted together).
      params: trainable collections ``{'params': ..., 'quant': ...}``.
      state: non-trainable collections ``{'batch_stats', 'qstate', 'calib', 'binary'}``.
      opt_state: the optax state of ``params``.
      mask: float32 0/1 tree shaped like ``params``; 0 freezes a leaf bit-exactly.
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


def get_path(tree: Mapping, path: Path, default: Any = None) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def set_path(tree: dict, path: Path, value: Any) -> dict:
    """Functional update: a copy of the nested dict ``tree`` with ``tree[path] = value``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    out = dict(tree)
    out[head] = set_path(dict(tree.get(head, {})), rest, value) if rest else value
    return out


def tree_paths(tree: Mapping, prefix: Path = ()) -> list[Path]:
    """All leaf paths of a nested dict, in insertion order."""
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(tree_paths(value, prefix + (key,)))
        else:
            out.append(prefix + (key,))
    return out


def map_with_path(fn, tree: Mapping, prefix: Path = ()) -> dict:
    """``fn(path, leaf)`` over a nested dict."""
    return {
        k: map_with_path(fn, v, prefix + (k,)) if isinstance(v, Mapping) else fn(prefix + (k,), v)
        for k, v in tree.items()
    }


def ones_mask(params: Mapping) -> dict:
    return jax.tree.map(lambda x: jnp.ones((), jnp.float32), dict(params))
