"""Observability: JSON-lines metrics, TensorBoard events, a progress line, summary and plot.

Only process 0 writes (``enabled=False`` elsewhere). Nothing here touches device arrays: callers
pass host numbers, fetched at log intervals.

* :class:`Reporter` -- ``metrics.jsonl``, TensorBoard events, progress and info lines;
* :func:`run_summary` / :func:`format_run_summary` / :func:`param_counts` -- a finished run's
  ``summary.json`` and its printed form;
* :func:`write_run_report` -- ``summary.json``, ``stages.png`` and ``model_summary.txt``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from qat_jax import summary as qsummary
from qat_jax.tree import get_path

__all__ = [
    "Reporter",
    "format_run_summary",
    "param_counts",
    "plot_stages",
    "run_summary",
    "warnings_to_stderr",
    "write_run_report",
]


def warnings_to_stderr() -> None:
    """Print the warnings of qat_jax's own loggers as one plain line each on stderr
    (``warning: <message>``), for the command-line tools; idempotent."""
    logger = logging.getLogger("qat_jax")
    if any(getattr(h, "_qat_jax_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    handler._qat_jax_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False  # not again through absl's or the root logger's handlers


class Reporter:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``workdir``; prints progress."""

    def __init__(self, workdir: str, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.progress = progress and enabled
        self.workdir = workdir
        self._tb = None
        self._jsonl = None
        self._last_time = time.perf_counter()
        self._last_step = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self._tb = None

    def write(self, step: int, kind: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **{k: _num(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def throughput(self, step: int, images_per_step: int) -> float:
        now = time.perf_counter()
        if self._last_step is None or step <= self._last_step:
            rate = 0.0
        else:
            rate = (step - self._last_step) * images_per_step / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        return rate

    def line(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def plot_stages(path: str, stage_acc: list[dict], fp_acc: float | None, title: str) -> None:
    """Test accuracy after each stage (``stage_acc``: ``[{'label', 'accuracy'}]``) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(stage_acc) + 3), 4))
    xs = list(range(1, len(stage_acc) + 1))
    ax.plot(xs, [100 * s["accuracy"] for s in stage_acc], marker="o", label="after stage")
    if fp_acc is not None:
        ax.axhline(100 * fp_acc, color="gray", linestyle="--", label=f"FP {100 * fp_acc:.1f}%")
    ax.set_xticks(xs)
    ax.set_xticklabels([s["label"] for s in stage_acc], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def param_counts(variables, binary_layers) -> dict:
    """Model parameters (the ``params`` collection) and how many of them are binary weights."""
    total = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
    binary = sum(
        int(np.size(get_path(variables, ("params", *q.path, "kernel")))) for q in binary_layers
    )
    return {"params": total, "binary_params": binary, "binary_param_share": binary / total}


def run_summary(
    config,
    *,
    fp_accuracy: float | None,
    final_accuracy: float,
    stage_accuracy: list[dict],
    num_quantizable_layers: int,
    num_stages: int,
    wall_seconds: float,
    timing_seconds: Mapping[str, float],
) -> dict:
    """The dict written as ``summary.json`` (without :func:`param_counts`, which the trainer
    adds); ``w1a1_accuracy`` is the final accuracy of a run with stages, ``None`` for ``fp``."""
    return {
        "method": config.method,
        "model": config.model.name,
        "dataset": config.dataset.name,
        "fp_accuracy": fp_accuracy,
        "w1a1_accuracy": final_accuracy if num_stages else None,
        "final_accuracy": final_accuracy,
        "stage_accuracy": stage_accuracy,
        "num_quantizable_layers": num_quantizable_layers,
        "num_stages": num_stages,
        "wall_seconds": wall_seconds,
        "timing_seconds": {k: round(v, 2) for k, v in timing_seconds.items()},
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
    }


def format_run_summary(s: Mapping) -> str:
    """The few lines a run prints at its end (``s``: :func:`run_summary`)."""
    lines = [f"== summary ({s['method']}, {s['model']} on {s['dataset']}) =="]
    if s["fp_accuracy"] is not None:
        lines.append(f"FP test accuracy:   {100 * s['fp_accuracy']:.2f}%")
    if s["w1a1_accuracy"] is not None:
        lines.append(f"W1A1 test accuracy: {100 * s['w1a1_accuracy']:.2f}%")
    lines.append(f"stages: {s['num_stages']}, wall time {s['wall_seconds']:.1f}s")
    return "\n".join(lines)


def write_run_report(
    reporter: Reporter, summary: Mapping, model, variables, image_shape: tuple
) -> None:
    """Write ``summary.json``, ``stages.png`` (a run with stages) and ``model_summary.txt`` into
    the reporter's workdir and print the summary and the model table (process 0 only)."""
    if not reporter.enabled:
        return
    workdir = reporter.workdir
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if summary["stage_accuracy"]:
        plot_stages(
            os.path.join(workdir, "stages.png"),
            summary["stage_accuracy"],
            summary["fp_accuracy"],
            f"{summary['method']}: test accuracy after each stage",
        )
    reporter.info(format_run_summary(summary))
    table = qsummary.format_summary(
        qsummary.model_summary(model, variables, image_shape), "model summary"
    )
    with open(os.path.join(workdir, "model_summary.txt"), "w") as f:
        f.write(table + "\n")
    reporter.info(table)
