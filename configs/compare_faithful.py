"""The default comparison on the faithful variant: every method on ``configs/faithful.py``.

``python -m qat_jax.compare --config=configs/compare_faithful.py --workdir=runs/compare_faithful``

``configs/compare_default.py`` with the base job of ``configs/faithful.py`` (no real-valued
shortcuts, binary depthwise convs, no activations-first step, one learning-rate schedule over all
QAT steps): the comparison of docs/results.md's earlier measurements.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "compare_default.py")
    c.base = load_sibling(__file__, "faithful.py")
    c.base.progress = False
    c.lock()
    return c
