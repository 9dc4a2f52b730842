"""Bring your own model: binarize a Flax network you wrote, with BiTAT, through public names only.

``python examples/custom_model.py [--workdir runs/custom_model --fp-steps 60 --steps-per-stage 30
--final-steps 20 --seed 0]``; rerun the same command to resume from its last checkpoint.

1. Build the network from the drop-in layers :class:`qat_jax.BinaryConv` / ``BinaryDense``; give
   each a ``block_id`` (the stage controller binarizes block by block; here one layer per block).
   Everything else (stem, BN, classifier) is plain Flax and stays full precision.
2. Validate the settings before any compute (:func:`qat_jax.experiment.validate_config`: one-line
   errors). Train it FP, then run the progressive schedule: at every stage boundary calibrate the
   next layer (thresholds, PCA transform), switch the modes (data in ``qstate``), re-estimate BN,
   rebuild the freeze mask, and checkpoint (:class:`qat_jax.train.checkpoint.RunCheckpointer`;
   the FP teacher with :func:`~qat_jax.train.checkpoint.save_variables`); then train. What
   ``qat_jax.train.trainer`` does, in short.
3. Export the W1A1 network bit-packed (``export_graph`` below lists its ops) and check that the
   packed XNOR-popcount forward gives the model's own eval logits.
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qat_jax
from qat_jax import experiment, export
from qat_jax.models import init_variables, quantizable_layers
from qat_jax.train import calibrate, checkpoint, parallel, schedules, steps
from qat_jax.train.config_files import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES, SIZE = 4, 16


class SmallCNN(nn.Module):
    """FP stem conv -> binary 3x3 convs with BN/ReLU -> global mean -> FP classifier."""

    quant: qat_jax.QuantConfig
    width: int = 16
    convs: tuple[tuple[int, int], ...] = ((1, 1), (2, 2))  # (width multiple, stride) per layer

    def _bn(self, train, name):  # eps/momentum as the exporter folds them (PyTorch's defaults)
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            axis_name=parallel.AXIS,
            name=name,
        )

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, name="stem")(x)
        x = nn.relu(self._bn(train, "stem_bn")(x))
        for i, (mult, stride) in enumerate(self.convs):
            x = qat_jax.BinaryConv(
                self.width * mult,
                (3, 3),
                (stride, stride),
                block_id=i,
                quant=self.quant,
                name=f"binary{i}",
            )(x)
            x = nn.relu(self._bn(train, f"bn{i}")(x))
        return nn.Dense(NUM_CLASSES, name="classifier")(jnp.mean(x, axis=(1, 2)))

    def export_graph(self, g: export.GraphBuilder) -> str:
        """The same forward as ops of the packed file (each conv with its BN folded in)."""
        x = g.act(g.conv_bn("x", ("stem",), ("stem_bn",), 1), "relu")
        for i, (_, stride) in enumerate(self.convs):
            x = g.act(g.conv_bn(x, (f"binary{i}",), (f"bn{i}",), stride), "relu")
        return g.dense(g.mean(x), ("classifier",))


def synthetic_data(seed: int, n: int):
    """Noisy images of ``NUM_CLASSES`` fixed random templates (stand-in for your data set)."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(1234).normal(size=(NUM_CLASSES, SIZE, SIZE, 1))
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    images = templates[labels] + rng.normal(size=(n, SIZE, SIZE, 1))
    return images.astype(np.float32), labels


def make_config(args):
    """The CLI's default config, with a few overrides: every key keeps its meaning."""
    config = load_config_file(os.path.join(ROOT, "configs", "default.py"))
    config.method, config.seed, config.batch_size = "bitat", args.seed, args.batch_size
    config.eval_batch_size = args.batch_size  # (the example evaluates in one jitted call)
    config.fp.steps, config.fp.warmup_steps = args.fp_steps, 5
    config.schedule.granularity = "layer"  # one stage per binary layer
    config.schedule.steps_per_stage, config.schedule.final_steps = (
        args.steps_per_stage,
        args.final_steps,
    )
    config.schedule.acts_first_steps = 0
    config.quant.fp_kinds = ()  # binarize every BinaryConv
    return config


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp-steps", type=int, default=60)
    p.add_argument("--steps-per-stage", type=int, default=30)
    p.add_argument("--final-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/custom_model", help="checkpoints; a rerun resumes")
    p.add_argument("--out", default=None, help="the .qat file (default: <workdir>/model.qat)")
    args = p.parse_args(argv)
    t0 = time.time()
    config = make_config(args)
    ndev = jax.local_device_count()
    try:  # every numeric setting, the batch size against the devices; nothing is computed
        experiment.validate_config(config, jax.device_count())
    except experiment.ConfigError as e:
        p.error(str(e))

    # The model and its quantizable layers (found from the variables: each BinaryConv's qstate).
    qcfg = experiment.quant_config(config)  # transform on: BiTAT
    model = SmallCNN(quant=qcfg)
    variables = init_variables(model, jax.random.PRNGKey(args.seed), (1, SIZE, SIZE, 1))
    layers = experiment.binary_layers(config, quantizable_layers(variables))
    controller = experiment.create_controller(config, layers, qat_start=args.fp_steps)
    print("binary layers:", [(q.path, q.block_id, q.kind) for q in layers])

    # Optimizers, steps (per device, pmapped), the train state.
    lr_fp = schedules.warmup_cosine(
        config.fp.learning_rate, config.fp.warmup_steps, config.fp.final_lr_fraction, args.fp_steps
    )
    lr_qat = schedules.qat_schedule(
        config.optim, controller, controller.total_steps - args.fp_steps
    )
    tx_fp = experiment.create_optimizer(config.fp, lr_fp)
    tx_qat = experiment.create_optimizer(config.optim, lr_qat)
    hstate = experiment.create_train_state(variables, tx_fp)
    loss_fp = experiment.loss_config(config, fp_phase=True)  # CE only; QAT's adds KD
    loss_qat = experiment.loss_config(config)
    p_train_fp = parallel.pmap(steps.make_train_step(model, tx_fp, loss_fp), donate_argnums=(0,))
    p_train_qat = parallel.pmap(steps.make_train_step(model, tx_qat, loss_qat), donate_argnums=(0,))
    stats_fn = parallel.pmap(lambda v, x: steps.input_stats_step(model, v, x))
    bn_fn = parallel.pmap(lambda v, x, base: steps.bn_step(model, v, x, base), in_axes=(0, 0, None))

    # Data: batches carry a leading device axis; a fixed pool for calibration and BN statistics.
    images, labels = synthetic_data(args.seed, 4096)
    per_dev = (ndev, args.batch_size // ndev)
    pool_x, _ = synthetic_data(args.seed + 2, 4 * args.batch_size)
    pool = [x.reshape(*per_dev, SIZE, SIZE, 1) for x in np.split(pool_x, 4)]
    test_x, test_y = synthetic_data(args.seed + 1, 256)
    eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))  # modes are data: one compile
    # A model of the zoo declares it (qat_jax.models.BN_MOMENTUM); a model of yours is measured.
    bn_momentum = calibrate.measure_bn_momentum(
        bn_fn, parallel.replicate(hstate.variables), pool[0]
    )

    def reestimate(hs):
        return calibrate.reestimate_bn(hs, bn_fn, pool[: config.schedule.bn_batches], bn_momentum)

    def accuracy(hs):
        logits = eval_fn(hs.variables, test_x)
        return float(np.mean(np.argmax(logits, -1) == test_y))

    def enter_stage(hs, k):
        """The boundary into stage ``k`` (``k == num_stages``: the final phase)."""
        if controller.entered >= 0:  # freeze the blocks the previous stage completed: B, alpha
            done = controller.stages[controller.entered].completes
            hs = calibrate.materialize_layers(hs, done, qcfg, config.quant.refine_sweeps)
        if k < controller.num_stages:  # thresholds tau and the PCA transform of the new layer(s)
            stage = controller.stages[k]
            hs = calibrate.calibrate_layers(
                hs,
                stage.layers if stage.weights else (),
                stats_fn,
                lambda: pool[: config.schedule.calib_batches],
                qcfg,
                config.quant.gamma,
                config.quant.tau_init,
                tau_layers=[p for p in stage.layers if p in controller.new_binary_inputs(k)],
            )
        hs = reestimate(calibrate.apply_modes(hs, controller.modes(k)))  # modes are data
        controller.entered = k
        print(f"entered {controller.describe(k)}: test acc {accuracy(hs):.3f}")
        return parallel.to_numpy(hs.replace(mask=controller.mask(k, hs.params)))

    # Checkpoints at every stage boundary and at the end; a rerun resumes from the newest one.
    ckpt = checkpoint.RunCheckpointer(os.path.join(args.workdir, "checkpoints"))
    teacher_dir = os.path.join(args.workdir, "teacher")
    teacher, start = None, 0
    restored = ckpt.restore_latest(hstate)  # FP and QAT optimizer states share one structure
    if restored is not None:
        start, hstate, meta = restored
        controller.restore(meta["controller"])
        if not controller.is_fp(controller.entered):
            teacher = parallel.replicate(checkpoint.load_variables(teacher_dir, hstate.variables))
        print(f"resumed from step {start} ({controller.describe(controller.entered)})")
    rstate = parallel.replicate(hstate)
    rng = parallel.replicate(jax.random.PRNGKey(args.seed + 3))  # dropout stream (none here)
    for step in range(start, controller.total_steps):
        k = controller.stage_at(step)
        if not controller.is_fp(k) and controller.entered < k:  # a stage boundary (host side)
            hstate = parallel.to_host(rstate)
            if controller.is_fp(
                controller.entered
            ):  # FP -> QAT: the FP model becomes the KD teacher
                hstate = reestimate(hstate)
                print(f"FP model: test acc {accuracy(hstate):.3f}")
                checkpoint.save_variables(teacher_dir, hstate.variables)
                teacher = parallel.replicate(hstate.variables)
                hstate = hstate.replace(opt_state=tx_qat.init(hstate.params))
            hstate = enter_stage(hstate, k)
            ckpt.save(step, hstate, {"controller": controller.record()})
            rstate = parallel.replicate(hstate)
        i = (step * args.batch_size) % (len(images) - args.batch_size)
        batch = {"image": images[i : i + args.batch_size], "label": labels[i : i + args.batch_size]}
        batch = parallel.shard(jax.tree.map(lambda a: a.reshape(*per_dev, *a.shape[1:]), batch))
        train = p_train_fp if controller.is_fp(k) else p_train_qat
        rstate, _ = train(rstate, batch, rng, teacher)
    hstate = parallel.to_host(rstate)
    if controller.entered < controller.final_index:  # zero final steps: freeze the last stage here
        hstate = enter_stage(hstate, controller.final_index)
    hstate = reestimate(hstate)
    ckpt.save(controller.total_steps, hstate, {"controller": controller.record()})
    ckpt.close()

    # Export bit-packed and run the packed XNOR-popcount forward on the test images.
    out = args.out or os.path.join(args.workdir, "model.qat")
    nbytes = export.export_model(out, model, hstate.variables, (SIZE, SIZE, 1))
    packed = export.load_packed(out)
    eval_logits = np.asarray(eval_fn(hstate.variables, test_x))
    packed_logits = packed(test_x)
    err = np.max(np.abs(packed_logits - eval_logits)) / np.max(np.abs(eval_logits))
    print(
        f"W1A1 test acc {accuracy(hstate):.3f}; {out}: {nbytes} bytes, {packed.binary_bits()} "
        f"binary weights; max |packed - eval| / max|eval| = {err:.2g}; {time.time() - t0:.1f}s"
    )
    qstate = jax.tree.map(int, hstate.state["qstate"])  # every layer's w_mode, a_mode, block
    return {
        "resumed_from": start if restored is not None else None,
        "layers": layers,
        "qstate": qstate,
        "ops": packed.header["ops"],
        "eval_logits": eval_logits,
        "packed_logits": packed_logits,
    }


if __name__ == "__main__":
    main()
