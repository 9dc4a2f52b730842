"""The study budget of the accuracy work: the default model and data, trained long enough to tell
a recipe's defect from a short budget.

``python -m qat_jax.main --config=configs/study.py --workdir=runs/study``
``python -m qat_jax.compare --config=configs/compare_study.py --workdir=runs/compare_study``

Derived from ``configs/default.py`` (reduced MobileNetV2-CIFAR, Fashion-MNIST, batch 64, so one
epoch is 938 steps): FP 1,900 steps (2.0 epochs), then QAT 1,900 steps (2.0 epochs): six block
stages sharing 1,500 steps and a final phase of 400. Everything else (method, recipe switches) is
the default's, so ``--config.<key>=<value>`` ablates one lever at this budget.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "default.py")
    c.fp.steps = 1900
    c.fp.warmup_steps = 100
    c.schedule.steps_per_stage = 250  # 6 block stages x 250 = 1,500
    c.schedule.final_steps = 400
    c.log_every = 100
    c.checkpoint_every = 250
    c.lock()
    return c
