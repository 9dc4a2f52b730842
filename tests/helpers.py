"""Small helpers shared by test modules (import them as ``from helpers import ...``)."""

from __future__ import annotations

import ml_collections


def set_keys(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """``config`` with each dotted key set: ``set_keys(c, **{"quant.gamma": 0.5})``, as
    ``--config.quant.gamma=0.5`` would on the command line. Returns the same object (a locked
    config still refuses a key it lacks)."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
