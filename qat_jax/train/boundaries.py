"""What happens between stages, on the host train state (docs/method.md, 'Progressive,
aggregated schedule'): forward passes and host math only, no train step.

==============================  ==============================================================
:meth:`Boundaries.start_qat`    FP phase -> QAT: BN re-estimated, the FP model saved as the KD
                                teacher and evaluated, a fresh QAT optimizer state
:meth:`Boundaries.enter_stage`  into stage ``k``: materialise the blocks the previous stage
                                completed, re-estimate BN, evaluate, calibrate the new layer(s),
                                switch the modes, re-estimate BN, the stage's freeze mask
:meth:`Boundaries.finish`       end of the final phase: BN, evaluation on the whole test set
:meth:`Boundaries.finish_fp`    end of a run that trains FP only (method ``fp``)
:func:`quant_layer_metrics`     at logs, per binarizing layer: share of ``B`` flipped, error
==============================  ==============================================================

The schedule (which layers, which modes, which mask) comes from the
:class:`~qat_jax.train.stages.StageController`; the statistics from :mod:`qat_jax.train.calibrate`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qat_jax import data as qdata
from qat_jax import layers as qlayers
from qat_jax import models as qmodels
from qat_jax.train import calibrate, checkpoint, fp_init, parallel, reporting, steps
from qat_jax.train.stages import StageController
from qat_jax.train.state import TrainState
from qat_jax.tree import get_path

__all__ = ["Boundaries", "quant_layer_metrics"]


@dataclasses.dataclass
class Boundaries:
    """A run's stage boundaries: its schedule, its forward passes and its fixed batches.

    Attributes:
      config: the run's config (``schedule``, ``quant``, ``dataset``, ``eval_batch_size``,
        ``stage_eval_examples``, ``log_layer_metrics`` are read).
      controller: the run's stage controller (its ``entered`` is advanced here).
      qcfg: the binary layers' quant config.
      reporter: where transition records, evaluations and progress lines go.
      calib_pool: fixed train image batches ``[devices, b, H, W, C]`` for calibration
        (``schedule.calib_batches``) and BN re-estimation (``schedule.bn_batches``).
      eval_fn, stats_fn, bn_fn: the pmapped eval, input-statistics and BN steps of the model.
      bn_momentum: the models' BN momentum as their float32 update applies it.
      eval_data: the eval batches, resolved once per run.
    """

    config: ml_collections.ConfigDict
    controller: StageController
    qcfg: qlayers.QuantConfig
    reporter: reporting.Reporter
    calib_pool: list
    eval_fn: Callable
    stats_fn: Callable
    bn_fn: Callable
    bn_momentum: float
    eval_data: qdata.EvalCache = dataclasses.field(default_factory=qdata.EvalCache)

    @classmethod
    def create(cls, config, model, controller, qcfg, reporter, calib_pool) -> Boundaries:
        """The boundaries of a run of the zoo's ``model`` (its BN momentum is
        :data:`qat_jax.models.BN_MOMENTUM`)."""
        return cls(
            config=config,
            controller=controller,
            qcfg=qcfg,
            reporter=reporter,
            calib_pool=calib_pool,
            eval_fn=parallel.pmap(lambda v, b: steps.eval_step(model, v, b)),
            stats_fn=parallel.pmap(lambda v, x: steps.input_stats_step(model, v, x)),
            bn_fn=parallel.pmap(
                # base traced (in_axes None): base 0 and 1 share one compile (measure_bn_momentum)
                lambda v, x, base: steps.bn_step(model, v, x, base),
                in_axes=(0, 0, None),
            ),
            # float32(0.9), what calibrate.measure_bn_momentum finds on every model of the zoo.
            bn_momentum=float(np.float32(qmodels.BN_MOMENTUM)),
        )

    # -- forward passes -------------------------------------------------------------------------
    def evaluate(self, hstate: TrainState, stage: bool = False) -> dict:
        """Test accuracy, loss and count of ``hstate``'s model on the whole test set, or
        (``stage=True``) on its first ``config.stage_eval_examples`` examples (> 0)."""
        dcfg = self.config.dataset
        if stage:
            dcfg = _first_examples(dcfg, int(self.config.stage_eval_examples))
        rvars = parallel.replicate(hstate.variables)
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
        """BN statistics measured on the first ``schedule.bn_batches`` batches of the pool
        (``schedule.bn_estimate``: pooled into one batch, or the mean of per-batch statistics)."""
        sched = self.config.schedule
        return calibrate.reestimate_bn(
            hstate,
            self.bn_fn,
            self.calib_pool[: int(sched.bn_batches)],
            self.bn_momentum,
            pooled=sched.get("bn_estimate", "pooled") == "pooled",
        )

    def activation_metrics(self, hstate: TrainState, k: int) -> dict:
        """Per layer with a binary input in stage ``k``: its share of +1 after ``sign(x - tau)``
        on the calibration batches (``ones/<layer>``) and its dead / saturated channel counts."""
        binary_in = [
            p for p, (_, a) in self.controller.modes(k).items() if a == qlayers.BINARY_INPUT
        ]
        batches = self.calib_pool[: int(self.config.schedule.calib_batches)]
        stats = calibrate.activation_stats(hstate, binary_in, self.stats_fn, batches)
        out = {}
        for p, st in stats.items():
            name = "/".join(p)
            out[f"ones/{name}"] = st["ones"]
            out[f"dead/{name}"] = st["dead"]
            out[f"saturated/{name}"] = st["saturated"]
        out["dead_channels"] = sum(st["dead"] for st in stats.values())
        out["saturated_channels"] = sum(st["saturated"] for st in stats.values())
        return out

    # -- boundaries ------------------------------------------------------------------------------
    def start_qat(self, hstate: TrainState, tx_qat, teacher, teacher_dir: str):
        """FP phase -> QAT: re-estimate BN, save the FP model as the KD teacher (``teacher``, a
        loaded FP init, or else the trained FP model), evaluate it, fresh QAT optimizer state.

        Returns ``(hstate, teacher, fp_accuracy)``.
        """
        hstate, teacher, fp_acc = self._fp_model(hstate, teacher_dir, teacher)
        self.reporter.info(f"FP model: test accuracy {100 * fp_acc:.2f}%")
        self.reporter.write(int(hstate.step), "eval", {"fp_accuracy": fp_acc})
        hstate = hstate.replace(opt_state=tx_qat.init(hstate.params))
        return hstate, teacher, fp_acc

    def finish_fp(self, hstate: TrainState, teacher_dir: str) -> tuple[TrainState, float]:
        """End of a run that trains FP only: BN re-estimated, the FP model saved to
        ``teacher_dir`` (for later runs' ``config.init``), its test accuracy."""
        hstate, _, fp_acc = self._fp_model(hstate, teacher_dir)
        return hstate, fp_acc

    def _fp_model(self, hstate: TrainState, teacher_dir: str, teacher=None):
        hstate = self.reestimate(hstate)
        if teacher is None:
            teacher = fp_init.fp_variables(hstate)
        checkpoint.save_variables(teacher_dir, teacher)  # every process takes part
        return hstate, teacher, self.evaluate(hstate)["accuracy"]

    def enter_stage(
        self, hstate: TrainState, k: int, stage_acc: list, stage_seconds: float
    ) -> TrainState:
        """Apply the boundary into stage ``k`` (or into the final phase, ``k == final_index``).

        The stage entered last is closed first: its completed blocks materialised and evaluated
        (appended to ``stage_acc``; ``stage_seconds`` is its train time, for the progress line).
        Writes a ``transition`` record (BN shifts, activation shares) and advances
        ``controller.entered`` to ``k``. Returns the new host state (numpy).
        """
        c, cfg = self.controller, self.config
        t0 = time.perf_counter()
        diag: dict = {}  # diagnostics for the transition record (no effect on the state)
        for prev in range(c.entered, k):
            if not c.is_fp(prev):
                hstate = calibrate.materialize_layers(
                    hstate, c.stages[prev].completes, self.qcfg, int(cfg.quant.refine_sweeps)
                )
        if not c.is_fp(c.entered):
            # Accuracy after the previous stage (with its completed blocks materialised).
            hstate = calibrate.apply_modes(hstate, c.modes_after(c.entered))
            before = hstate.state.get("batch_stats", {})
            hstate = self.reestimate(hstate)
            # Running statistics trained during the stage vs exact ones at its end.
            shift = calibrate.bn_shift(before, hstate.state.get("batch_stats", {}))
            diag.update({f"bn_stage_end_{name}": v for name, v in shift.items()})
            if cfg.stage_eval_examples != 0:
                ev = self.evaluate(hstate, stage=True)
                stage_acc.append({"label": c.describe(c.entered), "accuracy": ev["accuracy"]})
                self.reporter.write(int(hstate.step), "eval", {"stage_accuracy": ev["accuracy"]})
                self.reporter.info(
                    f"after {c.describe(c.entered)}: test acc {100 * ev['accuracy']:.2f}% "
                    f"({stage_seconds:.1f}s)"
                )
        if not c.is_final(k):
            # BN statistics are current here: re-estimated after the previous stage's last switch
            # (just above, or before the FP evaluation when k == 0). A stage that binarizes inputs
            # only sets thresholds: its layers' transforms are calibrated when their weights are.
            stage = c.stages[k]
            hstate = calibrate.calibrate_layers(
                hstate,
                stage.layers if stage.weights else (),
                self.stats_fn,
                lambda: self.calib_pool[: int(cfg.schedule.calib_batches)],
                self.qcfg,
                float(cfg.quant.gamma),
                cfg.quant.tau_init,
                tau_layers=[p for p in stage.layers if p in c.new_binary_inputs(k)],
            )
        hstate = calibrate.apply_modes(hstate, c.modes(k))
        before = hstate.state.get("batch_stats", {})
        hstate = self.reestimate(hstate)
        # What switching the modes of stage k did to the BN statistics.
        shift = calibrate.bn_shift(before, hstate.state.get("batch_stats", {}))
        diag.update({f"bn_switch_{name}": v for name, v in shift.items()})
        if cfg.log_layer_metrics:
            diag.update(self.activation_metrics(hstate, k))
        hstate = hstate.replace(mask=c.mask(k, hstate.params))
        c.entered = k
        record = {"stage": k, "seconds": time.perf_counter() - t0, **diag}
        self.reporter.write(int(hstate.step), "transition", record)
        return parallel.to_numpy(hstate)

    def finish(self, hstate: TrainState, stage_acc: list) -> tuple[TrainState, float]:
        """End of the final phase: the last stage closed if the final phase had no steps, with
        ``schedule.final_train_latent`` every layer materialised, BN re-estimated; returns the
        state and its accuracy on the whole test set (also appended to ``stage_acc``)."""
        c = self.controller
        if c.entered < c.final_index:  # zero final steps: the last stage's blocks materialise here
            hstate = self.enter_stage(hstate, c.final_index, stage_acc, 0)
        if c.cfg.final_train_latent:
            hstate = calibrate.materialize_layers(
                hstate, c.layers, self.qcfg, int(self.config.quant.refine_sweeps)
            )
            hstate = calibrate.apply_modes(hstate, c.finished_modes())
        hstate = self.reestimate(hstate)
        final = self.evaluate(hstate)["accuracy"]
        stage_acc.append({"label": "final", "accuracy": final})
        return hstate, final


def _first_examples(dcfg, num_eval: int):
    """The data config limited to the first ``num_eval`` test examples (``<= 0``: unchanged)."""
    d = ml_collections.ConfigDict(dcfg.to_dict())
    if num_eval and num_eval > 0:
        d.num_eval_examples = (
            num_eval if d.num_eval_examples < 0 else min(num_eval, d.num_eval_examples)
        )
    return d


def quant_layer_metrics(hstate: TrainState, layers, qcfg, prev_b: dict) -> dict:
    """Per binarizing layer of ``layers``: the share of ``B`` entries flipped since the last call
    (``flip/<layer>``; ``prev_b`` keeps the last ``B``) and the relative error ``binerr/<layer>``."""
    out = {}
    for p in layers:
        if int(get_path(hstate.state, ("qstate", *p, "w_mode"))) != qlayers.BINARIZING:
            continue
        # The same jitted function as materialisation: one compile per layer shape for both.
        b, _, err = calibrate.binary_weights_and_error(
            get_path(hstate.params, ("params", *p, "kernel")),
            get_path(hstate.state, ("binary", *p, "B")).shape[0],
            get_path(hstate.params, ("quant", *p)),
            get_path(hstate.state, (qlayers.CALIB, *p), {}),
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
