"""BiTAT on ImageNet with MobileNetV2 (torchvision layout, width 1.0): paper scale, for TPU pods.

Data: an ``imagenet2012`` TFDS build in ArrayRecord format in ``data_dir`` (docs/data.md).
Schedule (ours): start from a pretrained FP model (``--config.init=<dir>``, e.g. a converted
torchvision checkpoint) or train one for 150 epochs; then one stage per layer (51) of 1 epoch each,
then 30 epochs all binary. Global batch 1024 (1251 steps an epoch), Adam 5e-4 with warmup + cosine,
label smoothing 0.1, KD from the FP model. Not run on this project's CPU machines.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling

STEPS_PER_EPOCH = 1_281_167 // 1024


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "default.py")
    c.model.variant = "imagenet"
    c.model.width_mult = 1.0
    c.model.inverted_residual_setting = None
    c.model.last_channel = None
    c.model.dropout_rate = 0.2
    c.dataset.name = "imagenet2012"
    c.dataset.image_size = 224
    c.batch_size = 1024
    c.eval_batch_size = 1000
    c.stage_eval_examples = 10_000
    c.fp.steps = 150 * STEPS_PER_EPOCH
    c.fp.learning_rate = 2e-3
    c.fp.warmup_steps = 5 * STEPS_PER_EPOCH
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = STEPS_PER_EPOCH // 10  # of every stage (per_stage schedule)
    c.loss.label_smoothing = 0.1
    c.schedule.granularity = "layer"
    c.schedule.steps_per_stage = STEPS_PER_EPOCH
    c.schedule.acts_first_steps = STEPS_PER_EPOCH  # one stage's worth
    c.schedule.final_steps = 30 * STEPS_PER_EPOCH
    c.schedule.calib_batches = 4
    # Pooled BN estimate (the default's): one train-mode forward over 4 x 1024 images, 4096 / the
    # number of devices per device.
    c.schedule.bn_batches = 4
    c.log_every = 100
    c.checkpoint_every = 2000
    c.lock()
    return c
