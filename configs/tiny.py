"""A tiny configuration for tests and smoke runs: seconds, not minutes (accuracy is meaningless).

Derived from ``configs/faithful.py`` (the method as first formulated, so every binary path --
depthwise convs included -- runs): a two-block MobileNetV2-CIFAR of width 8, a few hundred
Fashion-MNIST examples, 3 steps per stage. Tests of the default recipe's switches turn them on.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "faithful.py")
    c.model.width_mult = 0.25
    c.model.inverted_residual_setting = ((1, 8, 1, 1), (2, 8, 1, 2))
    c.model.last_channel = 16
    c.dataset.num_train_examples = 512
    c.dataset.num_eval_examples = 200
    c.batch_size = 16
    c.eval_batch_size = 64
    c.stage_eval_examples = 64
    c.fp.steps = 8
    # The learning rates the tests were written against (the default's are tuned for its budget).
    c.fp.learning_rate = 3e-3
    c.optim.learning_rate = 1e-3
    c.fp.warmup_steps = 2
    c.schedule.steps_per_stage = 3
    c.schedule.final_steps = 3
    c.schedule.calib_batches = 1
    c.schedule.bn_batches = 1
    c.log_every = 2
    c.checkpoint_every = 100
    c.progress = False
    c.lock()
    return c
