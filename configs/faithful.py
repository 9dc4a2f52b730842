"""BiTAT as first formulated: the faithful variant of the recipe, on the default job or the study's.

``python -m qat_jax.main --config=configs/faithful.py --workdir=runs/faithful``
``python -m qat_jax.main --config=configs/faithful.py:study --workdir=runs/study_faithful``

``configs/default.py`` (or, with ``:study``, ``configs/study.py``) with the four choices of its
recipe turned off: no real-valued shortcuts (the plain MobileNetV2), every conv but the stem
binary (depthwise included), no activations-first step, and one warmup + cosine learning-rate
schedule over all QAT steps. docs/results.md reports it beside the default recipe; its section
"The faithful variant at today's study settings" measures where its gap comes from, and that
``--config.optim.schedule=per_stage --config.optim.warmup_steps=20
--config.schedule.final_train_latent=True`` wins back what its progressive stages lose.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling

BASES = ("default", "study")


def get_config(base: str = "default") -> ml_collections.ConfigDict:
    if base not in BASES:
        raise ValueError(f"configs/faithful.py:<base>: base must be one of {BASES}, got {base!r}")
    c = load_sibling(__file__, f"{base}.py")
    c.model.binary_shortcut = False
    c.quant.fp_kinds = ()
    c.schedule.acts_first_steps = 0
    c.optim.schedule = "global"
    c.optim.warmup_steps = 0
    c.lock()
    return c
