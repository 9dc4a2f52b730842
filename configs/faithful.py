"""The default job with BiTAT as first formulated: the faithful variant of the recipe.

``python -m qat_jax.main --config=configs/faithful.py --workdir=runs/faithful``

``configs/default.py`` with the four choices of its recipe turned off: no real-valued shortcuts
(the plain MobileNetV2), every conv but the stem binary (depthwise included), no activations-first
step, and one warmup + cosine learning-rate schedule over all QAT steps. docs/results.md reports it
beside the default recipe.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "default.py")
    c.model.binary_shortcut = False
    c.quant.fp_kinds = ()
    c.schedule.acts_first_steps = 0
    c.optim.schedule = "global"
    c.optim.warmup_steps = 0
    c.lock()
    return c
