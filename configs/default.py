"""The embedded default: BiTAT on Fashion-MNIST with a reduced MobileNetV2-CIFAR, on a laptop CPU.

``python -m qat_jax.main --config=configs/default.py --workdir=runs/default``

FP training, one step with every layer's input binary, then every BiTAT stage (one per
inverted-residual block); sized to finish in a few minutes on a 2-core CPU.
Override anything with ``--config.<key>=<value>``.

The recipe is the best one measured at this budget (docs/results.md, "The recipe at the default
budget"): a real-valued shortcut around every binary conv, the depthwise convs kept FP, the
activations binarized first, and a learning-rate schedule restarted at every stage.
``configs/faithful.py`` is the same job with the method as first formulated (no shortcuts,
binary depthwise convs, one learning-rate schedule over all QAT steps).
"""

import ml_collections

from qat_jax.data import get_config_defaults


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # fp | xnor | reactnet | progressive | bitat_fixed | bitat (see docs/method.md).
    c.method = "bitat"
    # 'train_fp' trains the FP model first; a path loads a saved FP model (e.g. <workdir>/teacher).
    c.init = "train_fp"

    c.model = ml_collections.ConfigDict()
    c.model.name = "mobilenetv2"
    c.model.variant = "cifar"
    c.model.width_mult = 0.5
    # (expansion t, channels c, repeats n, stride s) per stage: a shallow MobileNetV2-CIFAR.
    c.model.inverted_residual_setting = (
        (1, 16, 1, 1),
        (6, 24, 1, 1),
        (6, 32, 1, 2),
        (6, 64, 1, 2),
        (6, 96, 1, 1),
    )
    c.model.last_channel = 256
    c.model.dropout_rate = 0.0
    c.model.conv_impl = "auto"
    c.model.dtype = "float32"
    # A real-valued shortcut around every binary conv (Bi-Real Net / ReActNet): BN(conv(x)) plus
    # x matched to the output's shape (channel repeat / group mean / 2x2 average pool), before
    # the activation; no parameters. The reactnet method turns it on whatever this says.
    c.model.binary_shortcut = True

    c.dataset = get_config_defaults()
    c.dataset.name = "fashion_mnist"
    c.dataset.image_size = 32

    c.batch_size = 64
    c.eval_batch_size = 500
    # Test examples used for the evaluation after each stage (-1: all; 0: none); the final
    # evaluation always uses the whole test split.
    c.stage_eval_examples = 500

    c.fp = ml_collections.ConfigDict()
    c.fp.steps = 400
    # Adam with BN takes a large step: 2e-2 beat 1e-2 and 3e-3 at this budget (docs/results.md).
    c.fp.learning_rate = 2e-2
    c.fp.warmup_steps = 30
    c.fp.final_lr_fraction = 0.01
    c.fp.grad_clip = 0.0
    c.fp.weight_decay = 0.0  # > 0: AdamW on the kernels (decoupled; experiment.create_optimizer)

    # QAT optimizer: Adam, no weight decay (our choice); warmup + cosine per stage (see schedule).
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 5
    c.optim.final_lr_fraction = 0.01
    c.optim.grad_clip = 0.0
    # > 0: AdamW on the kernels, i.e. the latent weights of the binary layers (decoupled).
    c.optim.weight_decay = 0.0
    # 'global': one warmup + cosine over all QAT steps; 'per_stage': warmup + cosine restarted at
    # the start of every stage and of the final phase (same warmup_steps / final_lr_fraction).
    c.optim.schedule = "per_stage"

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.0
    c.loss.kd_weight = 1.0
    c.loss.kd_temperature = 1.0
    c.loss.info_weight = 0.0

    c.quant = ml_collections.ConfigDict()
    c.quant.gamma = 0.25  # importance tempering exponent (docs/method.md, 'The transform')
    c.quant.weight_clip = 3.0  # STE clip relative to the row rms of W C (<= 0: no clip)
    c.quant.act_grad = "approx"  # 'approx' (ApproxSign) | 'ste'
    c.quant.tau_init = "mean"  # 'mean' | 'zero'
    c.quant.refine_sweeps = 0  # greedy flip sweeps when a block is materialised
    c.quant.train_transform = True
    # Layer kinds kept FP ('conv' | 'depthwise' | 'pointwise' | 'dense'); () binarizes every
    # conv but the stem (the classifier is always FP). The 3x3 depthwise convs of this model see
    # 8 to 48 channels: binarized, they cost more accuracy than anything else (docs/results.md),
    # for 15 % of the MACs (976,896 of 6,612,992).
    c.quant.fp_kinds = ("depthwise",)

    c.schedule = ml_collections.ConfigDict()
    # 'layer' (paper) | 'block' | 'all' | 'two_step' (methods xnor/reactnet set their own).
    c.schedule.granularity = "block"
    c.schedule.steps_per_stage = 30
    # 0: the model after the last stage is the result (its blocks are materialised at the end).
    c.schedule.final_steps = 0
    # > 0: the stages share this many steps whatever their number (equal budgets across methods;
    # the comparison sets it); 0: steps_per_stage each.
    c.schedule.total_stage_steps = 0
    c.schedule.final_train_latent = False
    # > 0: QAT starts with one extra stage of this many steps that binarizes every layer's input
    # (weights FP and trainable; ReActNet's first step), then the weight stages; 0: off.
    c.schedule.acts_first_steps = 40
    c.schedule.calib_batches = 2
    # BN statistics are re-estimated over this many train batches at every boundary and before
    # every evaluation (calibration reads the network with them too).
    c.schedule.bn_batches = 16
    # 'pooled': one train-mode forward over the bn_batches joined into one batch: the population
    # statistics of the network as evaluated (memory: that forward). 'per_batch': the mean of
    # each batch's statistics (PyTorch's update_bn; memory of one batch): biased with binary
    # activations, -3.6 points here at 16 batches (docs/results.md, "BN re-estimation").
    c.schedule.bn_estimate = "pooled"

    c.log_every = 30
    c.log_layer_metrics = True
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.progress = True
    # Stop (after writing a checkpoint) once this step is reached; <= 0: run to the end. For
    # preemption drills and resume tests: rerunning the same command continues.
    c.halt_after_step = -1

    c.lock()
    return c
