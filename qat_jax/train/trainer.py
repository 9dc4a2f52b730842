"""``train_and_evaluate(config, workdir)``: FP model -> W1A1 model with the progressive schedule.

Flow of one run (restartable at any point with the same command):

1. :func:`create_run`: validate the config, build data, model, stage controller, optimizers and
   pmapped steps from it (the builders of :mod:`qat_jax.experiment`);
   :func:`restore_or_start`: the latest complete checkpoint of the workdir, or step 0 (from the
   FP model ``config.init`` names, when it names one);
2. the loop over global steps: the FP phase, then every stage, each entered through its boundary
   (:class:`~qat_jax.train.boundaries.Boundaries`: the FP model saved as ``<workdir>/teacher`` and
   evaluated; materialise, BN, evaluate, calibrate, modes, freeze mask), then the final phase;
3. the final evaluation on the whole test set, ``summary.json``, ``stages.png``.

A run that does not quantize (method ``fp``) has a schedule with no stages: its FP phase is the
whole run. The wall time by phase (``timing_seconds`` of ``summary.json``) is measured with
:class:`~qat_jax.train.timing.Timer`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from qat_jax import data as qdata
from qat_jax import experiment
from qat_jax import layers as qlayers
from qat_jax import models as qmodels
from qat_jax.data.resolve import resolve
from qat_jax.experiment import ConfigError
from qat_jax.train import boundaries, checkpoint, fp_init, parallel, reporting, schedules, steps
from qat_jax.train.stages import StageController
from qat_jax.train.state import TrainState
from qat_jax.train.timing import Timer

__all__ = ["ConfigError", "Run", "create_run", "restore_or_start", "train_and_evaluate"]


@dataclasses.dataclass
class Run:
    """What a run builds from its config before its first step (:func:`create_run`), and the
    record its checkpoints carry (``teacher``, ``stage_acc``, ``fp_acc``)."""

    config: ml_collections.ConfigDict
    workdir: str
    info: qdata.DatasetInfo
    model: Any
    qcfg: qlayers.QuantConfig
    binary_layers: list  # the quantizable layers the schedule binarizes (qat_jax.models.QLayer)
    controller: StageController
    reporter: reporting.Reporter
    boundaries: boundaries.Boundaries
    train_iter: qdata.TrainIterator
    tx_qat: Any  # the QAT optimizer (its state is created when QAT starts)
    p_train_fp: Any  # pmapped train steps of the FP phase and of QAT
    p_train_qat: Any
    ckpt: checkpoint.RunCheckpointer
    train_rng: Any
    state: TrainState  # the host state at step 0
    param_counts: dict
    teacher: dict | None = None  # the FP model (KD teacher), once known
    stage_acc: list = dataclasses.field(default_factory=list)
    fp_acc: float | None = None

    @property
    def teacher_dir(self) -> str:
        return os.path.join(self.workdir, "teacher")

    def save(self, step: int, hstate: TrainState, timer: Timer) -> None:
        """Checkpoint ``hstate`` with the run's record; its time is billed to ``checkpoints``."""
        with timer.phase("checkpoints"):
            meta = {
                "controller": self.controller.record(),
                "data": self.train_iter.get_state(),
                "config": json.loads(self.config.to_json_best_effort()),
                "stage_acc": self.stage_acc,
                "fp_acc": self.fp_acc,
                "elapsed": timer.elapsed(),
                "rng": np.asarray(self.train_rng).tolist(),
                "step": int(step),
            }
            self.ckpt.save(step, hstate, meta)


def create_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Validate ``config`` (before any compute) and build everything its run needs."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    ndev = jax.local_device_count()
    experiment.validate_config(config, ndev * jax.process_count())
    reporter = reporting.Reporter(
        workdir, enabled=jax.process_index() == 0, progress=config.progress
    )

    # Data: the train split resolved once; two streams of it (training; calibration and BN).
    dataset = resolve(config.dataset)
    train_iter, calib_iter = (
        qdata.make_train_iterator(
            config.dataset, config.batch_size, seed=seed, num_local_devices=ndev, resolved=dataset
        )
        for seed in (config.seed, config.seed + 7919)
    )
    n_pool = max(int(config.schedule.calib_batches), int(config.schedule.bn_batches))
    calib_pool = [next(calib_iter)["image"] for _ in range(n_pool)]

    # Model and schedule.
    info = dataset.info
    qcfg = experiment.quant_config(config)
    model = experiment.create_model(config, info.num_classes, qcfg, bn_axis_name=parallel.AXIS)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = qmodels.init_variables(model, init_rng, (1, *info.image_shape))
    binary_layers = experiment.binary_layers(config, qmodels.quantizable_layers(variables))
    fp_steps = int(config.fp.steps) if config.init == "train_fp" else 0
    controller = experiment.create_controller(config, binary_layers, qat_start=fp_steps)
    fp = config.fp
    lr_fp = schedules.warmup_cosine(
        fp.learning_rate, fp.warmup_steps, fp.final_lr_fraction, fp_steps
    )
    # optim.schedule: 'global' (one cosine over all QAT steps) or 'per_stage' (restarted).
    lr_qat = schedules.qat_schedule(config.optim, controller, controller.total_steps - fp_steps)
    tx_fp = experiment.create_optimizer(fp, lr_fp)
    fp_model = qmodels.static_fp(model)
    tx_qat = experiment.create_optimizer(config.optim, lr_qat)
    fp_loss, qat_loss = (
        experiment.loss_config(config, fp_phase=True),
        experiment.loss_config(config),
    )
    return Run(
        config=config,
        workdir=workdir,
        info=info,
        model=model,
        qcfg=qcfg,
        binary_layers=binary_layers,
        controller=controller,
        reporter=reporter,
        boundaries=boundaries.Boundaries.create(
            config, model, controller, qcfg, reporter, calib_pool
        ),
        train_iter=train_iter,
        tx_qat=tx_qat,
        # The FP phase (every mode 0) and the KD teacher's forward pass run the FP model without
        # the per-layer switches (qmodels.static_fp): the same values, and neither program
        # compiles (or runs) the binary paths.
        p_train_fp=parallel.pmap(
            steps.make_train_step(fp_model, tx_fp, fp_loss, lr_fp), donate_argnums=(0,)
        ),
        p_train_qat=parallel.pmap(
            steps.make_train_step(model, tx_qat, qat_loss, lr_qat, teacher_model=fp_model),
            donate_argnums=(0,),
        ),
        ckpt=checkpoint.RunCheckpointer(
            os.path.join(workdir, "checkpoints"), config.keep_checkpoints
        ),
        train_rng=train_rng,
        # FP phase: latent weights, BN, stem and classifier train; quantizer variables do not.
        state=experiment.create_train_state(variables, tx_fp if fp_steps else tx_qat),
        param_counts=reporting.param_counts(
            variables, binary_layers if controller.quantizes else []
        ),
    )


def restore_or_start(run: Run, timer: Timer) -> TrainState:
    """The host state the run continues from: its latest complete checkpoint (the record put
    back into ``run``, its controller, its data iterator and ``timer``), else step 0, with the FP
    model of ``config.init`` when that is a path (it is also the KD teacher)."""
    # FP and QAT optimizers have the same structure (only their schedules differ).
    restored = run.ckpt.restore_latest(run.state)
    if restored is not None:
        step, hstate, meta = restored
        hstate = parallel.to_numpy(hstate)
        run.controller.restore(meta["controller"])
        run.train_iter.set_state(meta["data"])
        run.stage_acc, run.fp_acc = meta.get("stage_acc", []), meta.get("fp_acc")
        timer.elapsed_before = float(meta.get("elapsed", 0.0))
        run.reporter.info(
            f"resumed from step {step} ({os.path.join(run.ckpt.directory, str(step))})"
        )
        if os.path.isdir(run.teacher_dir):
            run.teacher = checkpoint.load_variables(run.teacher_dir, fp_init.fp_variables(hstate))
        return hstate
    if run.config.init == "train_fp":
        return run.state
    like = fp_init.fp_variables(run.state)
    run.teacher = fp_init.load_fp_init(run.config.init, like, run.model)
    return fp_init.with_fp_model(run.state, run.teacher)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) the configured job in ``workdir``; returns the summary dict."""
    timer = Timer()
    with timer.phase("startup"):
        run = create_run(config, workdir)
        hstate = restore_or_start(run, timer)
        c, total_steps = run.controller, run.controller.total_steps
        step = int(hstate.step)
        rstate = parallel.replicate(hstate)
        r_teacher = parallel.replicate(run.teacher) if run.teacher is not None else None
        rng = parallel.replicate(run.train_rng)
        acc_metrics, prev_b = [], {}  # device metrics since the last log; B at the last log
    stage_t0 = time.perf_counter()

    while step < total_steps:
        k = c.stage_at(step)
        if k > c.entered:  # a stage boundary, on the host between two steps
            with timer.phase(_train_phase(c, c.entered)):
                # Steps run asynchronously: wait for those in flight and bill them to their
                # phase, not to the boundary (benchmarks/bench_run.py).
                jax.block_until_ready(rstate)
            with timer.phase("transitions"):
                hstate = parallel.to_host(rstate)
                if c.is_fp(c.entered):
                    with timer.phase("qat_start"):  # FP evaluation and teacher save: no stage's
                        hstate, run.teacher, run.fp_acc = run.boundaries.start_qat(
                            hstate, run.tx_qat, run.teacher, run.teacher_dir
                        )
                    r_teacher = parallel.replicate(run.teacher)
                stage_seconds = time.perf_counter() - stage_t0
                hstate = run.boundaries.enter_stage(hstate, k, run.stage_acc, stage_seconds)
                stage_t0 = time.perf_counter()
                _check_finite(acc_metrics, step, run.ckpt.directory)  # no checkpoint after NaN
                rstate = parallel.replicate(hstate)
            run.save(step, hstate, timer)
        # Steps run asynchronously: their time shows up at the log's host sync, so the phase time
        # includes the logging (and the per-layer metrics).
        with timer.phase(_train_phase(c, k)):
            batch = parallel.shard(next(run.train_iter))
            if c.is_fp(k):
                rstate, metrics = run.p_train_fp(rstate, batch, rng, None)
            else:
                rstate, metrics = run.p_train_qat(rstate, batch, rng, r_teacher)
            acc_metrics.append(metrics)
            step += 1
            checkpoint.fault_point("step", step)  # test hook (SIGKILL tests), a no-op unless set
            if step % config.log_every == 0 or step == total_steps:
                _log(run, step, k, acc_metrics, rstate, prev_b)
                acc_metrics = []
        halt = int(config.halt_after_step) > 0 and step == int(config.halt_after_step)
        if (step % config.checkpoint_every == 0 or halt) and step < total_steps:
            _check_finite(acc_metrics, step, run.ckpt.directory)
            run.save(step, parallel.to_host(rstate), timer)
        if halt and step < total_steps:
            run.reporter.info(f"halted after step {step} (halt_after_step); rerun to resume")
            run.ckpt.close()
            run.reporter.close()
            return {"halted_at": step}

    with timer.phase("final"):
        hstate = parallel.to_host(rstate)
        if c.quantizes:
            hstate, final = run.boundaries.finish(hstate, run.stage_acc)
        else:  # method fp: the FP model is the run's result (and later runs' config.init)
            hstate, final = run.boundaries.finish_fp(hstate, run.teacher_dir)
            run.fp_acc = final
    run.save(step, hstate, timer)
    run.ckpt.close()
    summary = reporting.run_summary(
        config,
        fp_accuracy=run.fp_acc,
        final_accuracy=final,
        stage_accuracy=run.stage_acc,
        num_quantizable_layers=len(run.binary_layers),
        num_stages=c.num_stages,
        wall_seconds=timer.elapsed(),
        timing_seconds=timer.seconds,
    )
    summary.update(run.param_counts)
    reporting.write_run_report(
        run.reporter, summary, run.model, hstate.variables, run.info.image_shape
    )
    run.reporter.close()
    return summary


def _train_phase(c: StageController, k: int) -> str:
    """The ``timing_seconds`` key of train steps in stage ``k``."""
    return "fp_train" if c.is_fp(k) else "qat_train"


def _log(run: Run, step: int, k: int, acc_metrics: list, rstate, prev_b: dict) -> None:
    """Write the train metrics since the last log (means; ``lr`` of this step), the per-layer
    metrics of stage ``k``'s layers, and a progress line; stop on a non-finite step."""
    c, config = run.controller, run.config
    host_metrics = parallel.to_host(acc_metrics)
    m = jax.tree.map(lambda *xs: float(np.mean(xs)), *host_metrics)
    m["lr"] = float(host_metrics[-1]["lr"])  # the logged step's, not the window's mean
    if float(m["nonfinite"]) * len(acc_metrics) > 0:
        raise FloatingPointError(
            f"non-finite loss or gradients at step {step} (those updates were skipped; the "
            f"last good checkpoint in {run.ckpt.directory} is kept): lower the learning rate "
            "or check the data"
        )
    m = {name: float(v) for name, v in m.items()}
    rate = run.reporter.throughput(step, config.batch_size)
    if not c.is_fp(k) and config.log_layer_metrics:
        layers = c.stage_layers(k)
        m.update(boundaries.quant_layer_metrics(parallel.to_host(rstate), layers, run.qcfg, prev_b))
    m["images_per_s"] = rate
    run.reporter.write(step, "train", m)
    run.reporter.line(
        f"[{c.describe(k)}] step {step}/{c.total_steps} {rate:.0f} img/s "
        f"loss {m['loss']:.4f} acc {m['accuracy']:.3f}"
    )


def _check_finite(acc_metrics: list, step: int, ckpt_dir: str) -> None:
    """Raise before a checkpoint if a step since the last log had a non-finite loss/gradient."""
    bad = sum(float(parallel.to_host(m["nonfinite"])) for m in acc_metrics)
    if bad > 0:
        raise FloatingPointError(
            f"non-finite loss or gradients before step {step} (those updates were skipped; "
            f"nothing was written, the last good checkpoint in {ckpt_dir} is kept): lower the "
            "learning rate or check the data"
        )
