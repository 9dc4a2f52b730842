"""BiTAT on CIFAR-100 with MobileNetV2-CIFAR (width 1.0): a paper-scale setting (our choices).

Data: prepare once with ``python -m qat_jax.data --dataset=cifar100
--manual_dir=<dir with cifar-100-python.tar.gz> --data_dir=<data_dir>`` (docs/data.md).

Schedule (ours; the paper's numbers are unknown to us): FP 200 epochs (Adam 1e-3, cosine), then one
stage per layer (the paper's granularity; 51 layers) of 2 epochs each, then 20 epochs all binary.
Batch 256 (196 steps an epoch). QAT: Adam 5e-4, warmup + cosine over all QAT steps, no weight
decay on latent binary weights. Start from a saved FP model with ``--config.init=<dir>`` to skip the
FP phase. Not run on this project's CPU machines: needs an accelerator.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling

STEPS_PER_EPOCH = 50_000 // 256


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "default.py")
    c.model.width_mult = 1.0
    c.model.inverted_residual_setting = None  # the full seven stages
    c.model.last_channel = None  # torchvision rule: 1280
    c.model.dropout_rate = 0.2
    c.dataset.name = "cifar100"
    c.dataset.manual_dir = None
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.stage_eval_examples = -1
    c.fp.steps = 200 * STEPS_PER_EPOCH
    c.fp.learning_rate = 1e-3
    c.fp.warmup_steps = 5 * STEPS_PER_EPOCH
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = STEPS_PER_EPOCH // 5  # of every stage (per_stage schedule)
    c.schedule.granularity = "layer"
    c.schedule.steps_per_stage = 2 * STEPS_PER_EPOCH
    c.schedule.acts_first_steps = 2 * STEPS_PER_EPOCH  # one stage's worth
    c.schedule.final_steps = 20 * STEPS_PER_EPOCH
    c.schedule.calib_batches = 8
    c.schedule.bn_batches = 20  # pooled: 20 x 256 = 5120 images in one forward
    c.log_every = 100
    c.checkpoint_every = 2000
    c.log_layer_metrics = True
    c.lock()
    return c
