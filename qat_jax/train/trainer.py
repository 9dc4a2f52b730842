"""``train_and_evaluate(config, workdir)``: FP model -> W1A1 model with the progressive schedule.

Flow of one run (restartable at any point with the same command):

1. validate the config, build data, model and the stage controller from it (the builders of
   :mod:`qat_jax.experiment`); restore the latest complete checkpoint if the workdir has one;
2. FP phase (``config.init == 'train_fp'``) or load the FP model (``config.init = <path>``);
   the FP model becomes the KD teacher and is saved to ``<workdir>/teacher``;
3. for every stage: materialise blocks completed by the previous stage, re-estimate BN, evaluate,
   calibrate the new layer(s), switch modes, rebuild the freeze mask, re-estimate BN, checkpoint,
   then ``steps_per_stage`` pmapped train steps;
4. final phase, final evaluation on the whole test set, ``summary.json`` and ``stages.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qat_jax import data as qdata
from qat_jax import experiment, interop
from qat_jax import layers as qlayers
from qat_jax import models as qmodels
from qat_jax import summary as qsummary
from qat_jax.experiment import ConfigError
from qat_jax.train import calibrate, checkpoint, parallel, reporting, schedules, steps
from qat_jax.train.methods import method_settings
from qat_jax.train.stages import FP_PHASE, StageController
from qat_jax.train.state import TrainState
from qat_jax.tree import get_path

__all__ = ["train_and_evaluate", "ConfigError"]


# ---------------------------------------------------------------------------------------------
# Run


@dataclasses.dataclass
class _Run:
    config: Any
    workdir: str
    model: Any
    qcfg: qlayers.QuantConfig
    controller: StageController | None
    reporter: reporting.Reporter
    calib_pool: list
    eval_fn: Any
    calib_fn: Any
    bn_fn: Any
    bn_momentum: float = 0.9
    eval_data: qdata.EvalCache = dataclasses.field(default_factory=qdata.EvalCache)
    # Wall seconds by part of the run (this process, this session): startup (data, model, compiles
    # of the helpers), fp_train, qat_start (the FP model's evaluation and the teacher's save),
    # qat_train (incl. the first compile of each step), transitions (stage boundaries incl. their
    # evaluations), final (the final evaluation) and checkpoints (every checkpoint write: periodic,
    # at each stage boundary and the last one).
    timing: dict = dataclasses.field(default_factory=dict)

    def add_time(self, key: str, seconds: float) -> None:
        self.timing[key] = self.timing.get(key, 0.0) + float(seconds)

    def evaluate(self, hstate: TrainState, dcfg, teacher: bool = False) -> dict:
        variables = hstate if teacher else hstate.variables
        rvars = parallel.replicate(variables)
        total = None
        for batch in self.eval_data.get(  # resolved once per run, reused at every evaluation
            dcfg, self.config.eval_batch_size, num_local_devices=jax.local_device_count()
        ):
            out = self.eval_fn(rvars, parallel.shard(batch))
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        total = parallel.to_host(total)
        n = max(float(total["count"]), 1.0)
        return {
            "accuracy": float(total["correct"]) / n,
            "loss": float(total["loss"]) / n,
            "count": int(total["count"]),
        }

    def reestimate(self, hstate: TrainState) -> TrainState:
        n = int(self.config.schedule.bn_batches)
        return calibrate.reestimate_bn(hstate, self.bn_fn, self.calib_pool[:n], self.bn_momentum)


def _limited(dcfg, num_eval: int):
    d = ml_collections.ConfigDict(dcfg.to_dict())
    if num_eval and num_eval > 0:
        d.num_eval_examples = (
            num_eval if d.num_eval_examples < 0 else min(num_eval, d.num_eval_examples)
        )
    return d


def _quant_layer_metrics(hstate: TrainState, layers, qcfg, prev_b: dict) -> dict:
    """Per binarizing layer: share of ``B`` entries flipped since the last log, relative error."""
    out = {}
    for p in layers:
        if int(get_path(hstate.state, ("qstate", *p, "w_mode"))) != qlayers.BINARIZING:
            continue
        # The same jitted function as materialisation: one compile per layer shape for both.
        b, _, err = calibrate.binary_weights_and_error(
            get_path(hstate.params, ("params", *p, "kernel")),
            get_path(hstate.state, ("binary", *p, "B")).shape[0],
            get_path(hstate.params, ("quant", *p)),
            get_path(hstate.state, ("calib", *p), {}),
            qcfg,
            0,
        )
        name = "/".join(p)
        b = np.asarray(b)
        if name in prev_b:
            out[f"flip/{name}"] = float(np.mean(prev_b[name] != b))
        prev_b[name] = b
        out[f"binerr/{name}"] = float(err)
    return out


def _check_finite(acc_metrics: list, step: int, ckpt_dir: str) -> None:
    """Raise before a checkpoint if a step since the last log had a non-finite loss/gradient."""
    bad = sum(float(parallel.to_host(m["nonfinite"])) for m in acc_metrics)
    if bad > 0:
        raise FloatingPointError(
            f"non-finite loss or gradients before step {step} (those updates were skipped; "
            f"nothing was written, the last good checkpoint in {ckpt_dir} is kept): lower the "
            "learning rate or check the data"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) the configured job in ``workdir``; returns the summary dict."""
    t_start = t_session = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    ndev = jax.local_device_count()
    experiment.validate_config(config, ndev * jax.process_count())
    settings = method_settings(config.method)
    is_main = jax.process_index() == 0
    reporter = reporting.Reporter(workdir, enabled=is_main, progress=config.progress)

    # Data.
    dcfg = config.dataset
    info = qdata.dataset_info(dcfg)
    train_iter = qdata.make_train_iterator(
        dcfg, config.batch_size, seed=config.seed, num_local_devices=ndev
    )
    calib_iter = qdata.make_train_iterator(
        dcfg, config.batch_size, seed=config.seed + 7919, num_local_devices=ndev
    )
    n_pool = max(int(config.schedule.calib_batches), int(config.schedule.bn_batches))
    calib_pool = [next(calib_iter)["image"] for _ in range(n_pool)]

    # Model and schedule.
    qcfg = experiment.quant_config(config)
    model = experiment.create_model(config, info.num_classes, qcfg, bn_axis_name=parallel.AXIS)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    variables = qmodels.init_variables(model, init_rng, (1, *info.image_shape))
    qlayer_list = experiment.binary_layers(config, qmodels.quantizable_layers(variables))
    run_params = _param_counts(variables, qlayer_list if settings.quantize else [])
    fp_steps = int(config.fp.steps) if config.init == "train_fp" else 0
    controller = experiment.create_controller(config, qlayer_list, qat_start=fp_steps)
    total_steps = controller.total_steps if controller else fp_steps
    qat_steps = total_steps - fp_steps
    fp_cfg = config.fp
    lr_fp = schedules.warmup_cosine(
        fp_cfg.learning_rate, fp_cfg.warmup_steps, fp_cfg.final_lr_fraction, fp_steps
    )
    # optim.schedule: 'global' (one cosine over all QAT steps) or 'per_stage' (restarted).
    lr_qat = schedules.qat_schedule(config.optim, controller, qat_steps)
    tx_fp = experiment.create_optimizer(fp_cfg, lr_fp)
    tx_qat = experiment.create_optimizer(config.optim, lr_qat)
    # FP phase: latent weights, BN, stem and classifier train; quantizer variables do not.
    hstate = experiment.create_train_state(variables, tx_fp if fp_steps else tx_qat)

    loss_cfg = experiment.loss_config(config)
    fp_loss_cfg = experiment.loss_config(config, fp_phase=True)
    p_train_fp = parallel.pmap(
        steps.make_train_step(model, tx_fp, fp_loss_cfg, lr_fp), donate_argnums=(0,)
    )
    p_train_qat = parallel.pmap(
        steps.make_train_step(model, tx_qat, loss_cfg, lr_qat), donate_argnums=(0,)
    )
    run = _Run(
        config=config,
        workdir=workdir,
        model=model,
        qcfg=qcfg,
        controller=controller,
        reporter=reporter,
        calib_pool=calib_pool,
        eval_fn=parallel.pmap(lambda v, b: steps.eval_step(model, v, b)),
        calib_fn=parallel.pmap(lambda v, x: steps.calib_step(model, v, x)),
        bn_fn=parallel.pmap(
            # base traced (in_axes None): base 0 and 1 share one compile (benchmarks/bench_run.py)
            lambda v, x, base: steps.bn_step(model, v, x, base),
            in_axes=(0, 0, None),
        ),
    )
    run.bn_momentum = calibrate.measure_bn_momentum(
        run.bn_fn, parallel.replicate(hstate.variables), calib_pool[0]
    )

    # Restore.
    ckpt = checkpoint.RunCheckpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    teacher_dir = os.path.join(workdir, "teacher")
    teacher = None
    stage_acc: list[dict] = []
    fp_acc = None
    # FP and QAT optimizers have the same structure (only their schedules differ).
    restored = ckpt.restore_latest(hstate)
    if restored is not None:
        step, hstate, meta = restored
        hstate = parallel.to_numpy(hstate)
        if controller:
            controller.restore(meta["controller"])
        train_iter.set_state(meta["data"])
        stage_acc = meta.get("stage_acc", [])
        fp_acc = meta.get("fp_acc")
        t_start -= float(meta.get("elapsed", 0.0))
        reporter.info(f"resumed from step {step} ({os.path.join(ckpt.directory, str(step))})")
        if os.path.isdir(teacher_dir):
            teacher = checkpoint.load_variables(teacher_dir, _fp_variables(hstate))
    elif config.init != "train_fp":
        fp_vars = _load_fp_init(config.init, _fp_variables(hstate), model)
        teacher = fp_vars
        hstate = hstate.replace(
            params={**hstate.params, "params": fp_vars["params"]},
            state={**hstate.state, "batch_stats": fp_vars["batch_stats"]},
        )

    def meta(step_now):
        return {
            "controller": controller.record() if controller else {},
            "data": train_iter.get_state(),
            "config": json.loads(config.to_json_best_effort()),
            "stage_acc": stage_acc,
            "fp_acc": fp_acc,
            "elapsed": time.time() - t_start,
            "rng": np.asarray(train_rng).tolist(),
            "step": int(step_now),
        }

    def save(step_now, host_state):
        """Write a checkpoint of ``host_state``; its time is billed to ``checkpoints``."""
        t_ckpt = time.time()
        ckpt.save(step_now, host_state, meta(step_now))
        run.add_time("checkpoints", time.time() - t_ckpt)

    eval_stage_cfg = _limited(dcfg, int(config.stage_eval_examples))
    step = int(hstate.step)
    rstate = parallel.replicate(hstate)
    r_teacher = parallel.replicate(teacher) if teacher is not None else None
    rng_r = parallel.replicate(train_rng)
    images_per_step = config.batch_size
    acc_metrics = []
    prev_b: dict = {}
    stage_t0 = time.time()
    run.add_time("startup", time.time() - t_session)

    while step < total_steps:
        t_iter = time.time()
        k = controller.stage_at(step) if controller else FP_PHASE
        if controller and k != FP_PHASE and controller.entered < k:
            # Steps run asynchronously: wait for those in flight and bill them to their phase, not
            # to the boundary (benchmarks/bench_run.py).
            jax.block_until_ready(rstate)
            ran = "fp_train" if controller.entered == FP_PHASE else "qat_train"
            run.add_time(ran, time.time() - t_iter)
            t_iter = time.time()
            hstate = parallel.to_host(rstate)
            if controller.entered == FP_PHASE:
                t_start_qat = time.time()
                hstate, teacher, fp_acc = _start_qat(
                    run, hstate, tx_qat, teacher, teacher_dir, dcfg
                )
                r_teacher = parallel.replicate(teacher)
                # The FP model's test evaluation and the teacher's save: not a stage boundary.
                run.add_time("qat_start", time.time() - t_start_qat)
                t_iter += time.time() - t_start_qat
            hstate = _enter_stage(run, hstate, k, stage_acc, eval_stage_cfg, time.time() - stage_t0)
            stage_t0 = time.time()
            _check_finite(acc_metrics, step, ckpt.directory)  # never checkpoint after a bad step
            rstate = parallel.replicate(hstate)
            run.add_time("transitions", time.time() - t_iter)
            save(step, hstate)
            t_iter = time.time()
        batch = parallel.shard(next(train_iter))
        in_fp = k == FP_PHASE
        if in_fp:
            rstate, metrics = p_train_fp(rstate, batch, rng_r, None)
        else:
            rstate, metrics = p_train_qat(rstate, batch, rng_r, r_teacher)
        acc_metrics.append(metrics)
        step += 1
        checkpoint.fault_point("step", step)  # test hook (SIGKILL tests), a no-op unless set
        if step % config.log_every == 0 or step == total_steps:
            host_metrics = parallel.to_host(acc_metrics)
            m = jax.tree.map(lambda *xs: float(np.mean(xs)), *host_metrics)
            m["lr"] = float(host_metrics[-1]["lr"])  # the logged step's, not the window's mean
            nonfinite = float(m["nonfinite"]) * len(acc_metrics)
            acc_metrics = []
            if nonfinite > 0:
                raise FloatingPointError(
                    f"non-finite loss or gradients at step {step} (those updates were skipped; the "
                    f"last good checkpoint in {ckpt.directory} is kept): lower the learning rate "
                    "or check the data"
                )
            m = {k2: float(v) for k2, v in m.items()}
            rate = reporter.throughput(step, images_per_step)
            phase = controller.describe(k) if controller else "fp"
            if controller and not in_fp and config.log_layer_metrics:
                layers_now = controller.stages[min(k, controller.num_stages - 1)].layers
                m.update(_quant_layer_metrics(parallel.to_host(rstate), layers_now, qcfg, prev_b))
            m["images_per_s"] = rate
            reporter.write(step, "train", m)
            reporter.line(
                f"[{phase}] step {step}/{total_steps} {rate:.0f} img/s "
                f"loss {m['loss']:.4f} acc {m['accuracy']:.3f}"
            )
        # Steps run asynchronously: their time shows up at the log's host sync, so the phase time
        # includes the logging (and the per-layer metrics).
        run.add_time("fp_train" if in_fp else "qat_train", time.time() - t_iter)
        halt = int(config.halt_after_step) > 0 and step == int(config.halt_after_step)
        if (step % config.checkpoint_every == 0 or halt) and step < total_steps:
            _check_finite(acc_metrics, step, ckpt.directory)
            save(step, parallel.to_host(rstate))
        if halt and step < total_steps:
            reporter.info(f"halted after step {step} (halt_after_step); rerun to resume")
            ckpt.close()
            reporter.close()
            return {"halted_at": step}

    # End of run.
    t_final = time.time()
    hstate = parallel.to_host(rstate)
    if controller is None:
        hstate = run.reestimate(hstate)
        # The FP model, for later runs' config.init (the comparison shares it between methods).
        checkpoint.save_variables(teacher_dir, _fp_variables(hstate))
        fp_acc = run.evaluate(hstate, dcfg)["accuracy"]
        final = fp_acc
    else:
        if controller.entered < controller.final_index:
            # Zero final steps: the last stage's blocks are materialised here.
            hstate = _enter_stage(run, hstate, controller.final_index, stage_acc, eval_stage_cfg, 0)
        if controller.cfg.final_train_latent:
            hstate = calibrate.materialize_layers(
                hstate, controller.layers, qcfg, int(config.quant.refine_sweeps)
            )
            hstate = calibrate.apply_modes(hstate, controller.modes(controller.final_index + 1))
        hstate = run.reestimate(hstate)
        final = run.evaluate(hstate, dcfg)["accuracy"]
        stage_acc.append({"label": "final", "accuracy": final})
    run.add_time("final", time.time() - t_final)
    save(step, hstate)
    ckpt.close()
    summary = _summary(config, run, fp_acc, final, stage_acc, qlayer_list, time.time() - t_start)
    summary.update(run_params)
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if stage_acc:
            reporting.plot_stages(
                os.path.join(workdir, "stages.png"),
                stage_acc,
                fp_acc,
                f"{config.method}: test accuracy after each stage",
            )
        reporter.info(_format_summary(summary))
        table = qsummary.format_summary(
            qsummary.model_summary(model, hstate.variables, info.image_shape), "model summary"
        )
        with open(os.path.join(workdir, "model_summary.txt"), "w") as f:
            f.write(table + "\n")
        reporter.info(table)
    reporter.close()
    return summary


def _fp_variables(hstate: TrainState) -> dict:
    """The FP model's variables (every mode 0) from a host state: the teacher's structure."""
    qstate = jax.tree.map(np.zeros_like, hstate.state["qstate"])
    return {**hstate.params, **hstate.state, "qstate": qstate}


def _load_fp_init(path: str, like: dict, model=None) -> dict:
    """The FP model (``params`` and ``batch_stats``) saved at ``path`` onto this run's variables.

    ``path`` is the ``teacher`` of an earlier run, whatever its method: only the FP model is read
    (its quantizer variables, if any, are ignored). Variables that exist only in this method's
    model (ReActNet's RPReLU parameters, active only after binary convs) keep their initial
    values, so the FP function is unchanged. Missing or misshapen FP variables are an error.
    """
    if interop.is_torch_checkpoint(path):  # torchvision-layout weights (qat_jax.interop)
        try:
            return interop.load_torchvision_file(path, model, like)
        except interop.TorchImportError as e:
            raise ConfigError(str(e)) from None
    raw = checkpoint.load_variables(path, None)
    problems = []

    def fill(dst, src, where):
        out = {}
        for k, v in dst.items():
            name = "/".join((*where, k))
            if not isinstance(src, dict) or k not in src:
                new = k == "rprelu" or (isinstance(v, dict) and set(v) == {"rprelu"})
                if not new:  # RPReLU parameters are new in a reactnet model
                    problems.append(f"missing {name}")
                out[k] = v
            elif isinstance(v, dict):
                out[k] = fill(v, src[k], (*where, k))
            elif np.shape(src[k]) != np.shape(v):
                problems.append(f"{name} has shape {np.shape(src[k])}, expected {np.shape(v)}")
                out[k] = v
            else:
                out[k] = np.asarray(src[k], dtype=np.asarray(v).dtype)
        return out

    out = dict(like)
    for col in ("params", "batch_stats"):
        out[col] = fill(like[col], raw.get(col, {}), (col,))
    if problems:
        raise ConfigError(
            f"init checkpoint {path} does not fit this model ({len(problems)} problems: "
            f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}): check config.model"
        )
    return out


def _start_qat(run: _Run, hstate, tx_qat, teacher, teacher_dir, dcfg):
    """FP phase -> QAT: freeze the teacher, save it, evaluate it, fresh QAT optimizer state."""
    hstate = run.reestimate(hstate)
    if teacher is None:
        teacher = _fp_variables(hstate)
    checkpoint.save_variables(teacher_dir, teacher)  # every process takes part
    fp_acc = run.evaluate(hstate, dcfg)["accuracy"]
    run.reporter.info(f"FP model: test accuracy {100 * fp_acc:.2f}%")
    run.reporter.write(int(hstate.step), "eval", {"fp_accuracy": fp_acc})
    hstate = hstate.replace(opt_state=tx_qat.init(hstate.params))
    return hstate, teacher, fp_acc


def _enter_stage(run: _Run, hstate, k: int, stage_acc: list, eval_cfg, stage_seconds: float):
    """Apply the boundary into stage ``k`` (or the final phase when ``k == num_stages``)."""
    c = run.controller
    cfg = run.config
    t0 = time.time()
    diag: dict = {}  # diagnostics for the transition record (no effect on the state)
    for prev in range(c.entered, k):
        if prev >= 0:
            hstate = calibrate.materialize_layers(
                hstate, c.stages[prev].completes, run.qcfg, int(cfg.quant.refine_sweeps)
            )
    if c.entered >= 0:
        # Accuracy after the previous stage (with its completed blocks materialised).
        hstate = calibrate.apply_modes(hstate, _modes_after(c, c.entered))
        before = hstate.state.get("batch_stats", {})
        hstate = run.reestimate(hstate)
        # Running statistics trained during the stage vs exact ones at its end.
        shift = calibrate.bn_shift(before, hstate.state.get("batch_stats", {}))
        diag.update({f"bn_stage_end_{name}": v for name, v in shift.items()})
        if cfg.stage_eval_examples != 0:
            ev = run.evaluate(hstate, eval_cfg)
            stage_acc.append({"label": c.describe(c.entered), "accuracy": ev["accuracy"]})
            run.reporter.write(int(hstate.step), "eval", {"stage_accuracy": ev["accuracy"]})
            run.reporter.info(
                f"after {c.describe(c.entered)}: test acc {100 * ev['accuracy']:.2f}% "
                f"({stage_seconds:.1f}s)"
            )
    if k < c.num_stages:
        # BN statistics are current here: re-estimated after the previous stage's last switch
        # (just above, or before the FP evaluation when k == 0). A stage that binarizes inputs
        # only sets thresholds: its layers' transforms are calibrated when their weights are.
        stage = c.stages[k]
        hstate = calibrate.calibrate_layers(
            hstate,
            stage.layers if stage.weights else (),
            run.calib_fn,
            lambda: run.calib_pool[: int(cfg.schedule.calib_batches)],
            run.qcfg,
            float(cfg.quant.gamma),
            cfg.quant.tau_init,
            tau_layers=[p for p in c.stages[k].layers if p in c.new_binary_inputs(k)],
        )
    hstate = calibrate.apply_modes(hstate, c.modes(k))
    before = hstate.state.get("batch_stats", {})
    hstate = run.reestimate(hstate)
    # What switching the modes of stage k did to the BN statistics.
    shift = calibrate.bn_shift(before, hstate.state.get("batch_stats", {}))
    diag.update({f"bn_switch_{name}": v for name, v in shift.items()})
    if cfg.log_layer_metrics:
        diag.update(_activation_metrics(run, hstate, c, k))
    hstate = hstate.replace(mask=c.mask(k, hstate.params))
    c.entered = k
    record = {"stage": k, "seconds": time.time() - t0, **diag}
    run.reporter.write(int(hstate.step), "transition", record)
    return parallel.to_numpy(hstate)


def _activation_metrics(run: _Run, hstate, c: StageController, k: int) -> dict:
    """Per layer with a binary input in stage ``k``: its share of +1 after ``sign(x - tau)`` on
    the calibration batches (``ones/<layer>``) and its dead / saturated channel counts."""
    binary_in = [p for p, (_, a) in c.modes(k).items() if a == 1]
    batches = run.calib_pool[: int(run.config.schedule.calib_batches)]
    stats = calibrate.activation_stats(hstate, binary_in, run.calib_fn, batches)
    out = {}
    for p, st in stats.items():
        name = "/".join(p)
        out[f"ones/{name}"] = st["ones"]
        out[f"dead/{name}"] = st["dead"]
        out[f"saturated/{name}"] = st["saturated"]
    out["dead_channels"] = sum(st["dead"] for st in stats.values())
    out["saturated_channels"] = sum(st["saturated"] for st in stats.values())
    return out


def _modes_after(c: StageController, k: int):
    """Modes at the end of stage ``k``: its completed blocks frozen binary, the rest as in ``k``."""
    modes = dict(c.modes(k))
    for p in c.stages[k].completes:
        modes[p] = (qlayers.FROZEN, 1)
    return modes


def _param_counts(variables, binary_layers) -> dict:
    """Model parameters (the ``params`` collection) and how many of them are binary weights."""
    total = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
    binary = sum(
        int(np.size(get_path(variables, ("params", *q.path, "kernel")))) for q in binary_layers
    )
    return {"params": total, "binary_params": binary, "binary_param_share": binary / total}


def _summary(config, run: _Run, fp_acc, final, stage_acc, qlayer_list, seconds) -> dict:
    return {
        "method": config.method,
        "model": config.model.name,
        "dataset": config.dataset.name,
        "fp_accuracy": fp_acc,
        "w1a1_accuracy": final if run.controller else None,
        "final_accuracy": final,
        "stage_accuracy": stage_acc,
        "num_quantizable_layers": len(qlayer_list),
        "num_stages": run.controller.num_stages if run.controller else 0,
        "wall_seconds": seconds,
        "timing_seconds": {k: round(v, 2) for k, v in run.timing.items()},
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
    }


def _format_summary(s: dict) -> str:
    lines = [f"== summary ({s['method']}, {s['model']} on {s['dataset']}) =="]
    if s["fp_accuracy"] is not None:
        lines.append(f"FP test accuracy:   {100 * s['fp_accuracy']:.2f}%")
    if s["w1a1_accuracy"] is not None:
        lines.append(f"W1A1 test accuracy: {100 * s['w1a1_accuracy']:.2f}%")
    lines.append(f"stages: {s['num_stages']}, wall time {s['wall_seconds']:.1f}s")
    return "\n".join(lines)
