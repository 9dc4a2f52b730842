"""BiTAT on CIFAR-10 with ResNet-20 (16/32/64 channels, option-B shortcuts): our choices.

Data: ``python -m qat_jax.data --dataset=cifar10 --manual_dir=<dir with
cifar-10-python.tar.gz> --data_dir=<data_dir>``. FP 200 epochs, then one stage per block (9 basic
blocks; a block's shortcut conv belongs to it) of 5 epochs, then 20 epochs all binary. Batch 128.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling

STEPS_PER_EPOCH = 50_000 // 128


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "default.py")
    c.model = ml_collections.ConfigDict(
        {"name": "resnet20", "conv_impl": "auto", "dtype": "float32"}
    )
    c.dataset.name = "cifar10"
    c.dataset.manual_dir = None
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.stage_eval_examples = -1
    c.fp.steps = 200 * STEPS_PER_EPOCH
    c.fp.learning_rate = 1e-3
    c.fp.warmup_steps = 2 * STEPS_PER_EPOCH
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = STEPS_PER_EPOCH // 2  # of every stage (per_stage schedule)
    c.schedule.granularity = "block"
    c.schedule.steps_per_stage = 5 * STEPS_PER_EPOCH
    c.schedule.acts_first_steps = 5 * STEPS_PER_EPOCH  # one stage's worth
    c.schedule.final_steps = 20 * STEPS_PER_EPOCH
    c.log_every = 100
    c.checkpoint_every = 2000
    c.lock()
    return c
