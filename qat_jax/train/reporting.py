"""Observability: JSON-lines metrics, TensorBoard events, a progress line, summary and plot.

Only process 0 writes (``enabled=False`` elsewhere). Nothing here touches device arrays: callers
pass host numbers, fetched at log intervals.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

__all__ = ["Reporter", "plot_stages", "warnings_to_stderr"]


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
