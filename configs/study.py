"""The study budget of the accuracy work: the default model and data, trained long enough to tell
a recipe's defect from a short budget.

``python -m qat_jax.main --config=configs/study.py --workdir=runs/study``
``python -m qat_jax.compare --config=configs/compare_study.py --workdir=runs/compare_study``

Derived from ``configs/default.py`` (reduced MobileNetV2-CIFAR, Fashion-MNIST, batch 64, so one
epoch is 938 steps): FP 1,900 steps (2.0 epochs), then QAT 2,900 steps (3.1 epochs): the
activations-first step (250), six block stages of 375 steps (2,250) and a final phase of 400.
Everything else (method, recipe switches) is the default's, so ``--config.<key>=<value>``
ablates one lever at this budget.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "default.py")
    c.fp.steps = 1900
    # FP Adam 3e-3 (the default job's 2e-2 was tuned at its short budget only); QAT Adam 3e-3, as
    # the default job's: with 375 steps a stage it gave 87.57 % against 85.41 % at 1e-3 (seed 0,
    # docs/results.md, "Where the study budget's extra steps go"; the earlier study rows used
    # 1e-3 and 250 steps a stage:
    # --config.optim.learning_rate=1e-3 --config.schedule.steps_per_stage=250). BN: the
    # default's pooled estimate over 16 batches.
    c.fp.learning_rate = 3e-3
    c.optim.learning_rate = 3e-3
    c.fp.warmup_steps = 100
    c.schedule.steps_per_stage = 375  # 6 block stages x 375 = 2,250
    c.schedule.final_steps = 400
    c.schedule.acts_first_steps = 250  # as long as a stage of the earlier study
    c.optim.warmup_steps = 20  # of every stage (optim.schedule='per_stage')
    c.log_every = 100
    c.checkpoint_every = 250
    c.lock()
    return c
