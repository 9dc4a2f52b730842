"""The default comparison: every method of docs/method.md ('Methods sharing the code') on the
default job, three seeds.

``python -m qat_jax.compare --config=configs/compare_default.py --workdir=runs/compare``

Every run uses ``configs/default.py`` (reduced MobileNetV2-CIFAR on Fashion-MNIST) with only
``method`` and ``seed`` changed; QAT methods start from the seed's FP model and their stages share
the same number of steps (``total_stage_steps``). Override the base with
``--config.base.<key>=<value>`` (e.g. ``--config.base.schedule.steps_per_stage=60``).
"""

import ml_collections

from qat_jax.train.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = load_sibling(__file__, "default.py")
    c.base.progress = False
    c.methods = ("fp", "xnor", "reactnet", "progressive", "bitat_fixed", "bitat")
    c.seeds = (0, 1, 2)
    # QAT steps shared by the stages of every method; 0: the base schedule's stages x
    # steps_per_stage (for the default: 6 blocks x 30 = 180), then base.schedule.final_steps.
    c.total_stage_steps = 0
    c.lock()
    return c
