"""Methods x seeds from one base config, sharing one FP teacher per seed: a table and plots.

The library of the comparison; its command line is ``python -m qat_jax.compare``
(:mod:`qat_jax.compare.__main__`), the same split as :mod:`qat_jax.summary`.

``run_comparison(config, workdir)`` runs, for every seed:

1. ``fp`` (the base config with ``method='fp'``) in ``<workdir>/seed<S>/fp``; it trains the FP
   model and saves it to ``<workdir>/seed<S>/fp/teacher``;
2. every other method in ``<workdir>/seed<S>/<method>``, starting from that FP model
   (``init = <teacher>``, so no method trains its own FP model; except ``reactnet`` on a model
   with the ``binary_shortcut`` option, whose shortcuts make another FP network: it trains its
   own FP model with them, ``init = 'train_fp'``, see :func:`changes_architecture`) with the
   **same QAT budget**:
   the stages of every method share ``total_stage_steps`` steps (default: the base schedule's
   number of stages x ``steps_per_stage``), then ``final_steps``. Same model, data, seed,
   optimizer, loss; only the method differs.

Every run is a child process (``python -m qat_jax.compare.run_one <run_dir>`` on the recorded
config, :mod:`qat_jax.compare.run_one`):
a long comparison compiles hundreds of XLA programs, which one process would keep mapped until it
hits the kernel's map limit (measured: an in-process comparison died with "LLVM ERROR: Unable to
allocate section memory" in its 13th run), and a crash of one run then stops only that run.
A run whose ``summary.json`` exists is finished and is not run again, so an interrupted comparison
resumes (an interrupted run resumes from its own checkpoints). Each run records the config it was
run with (``compare_run.json``); a finished run whose config differs from what the comparison
would run now is an error, not silently mixed into the table.

Then it writes ``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds: test
accuracy, gap to FP, binary-parameter share, train time), ``comparison.png`` (bars with the std)
and ``stages.png`` (test accuracy after each stage of the progressive methods, mean over seeds).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import ml_collections
import numpy as np

from qat_jax.train.methods import METHODS, method_settings

__all__ = [
    "run_comparison",
    "run_configs",
    "stage_budget",
    "changes_architecture",
    "aggregate",
    "write_results",
]

#: Methods whose per-stage accuracies go into ``stages.png``.
PROGRESSIVE = ("progressive", "bitat_fixed", "bitat")


def stage_budget(base: ml_collections.ConfigDict) -> int:
    """The base schedule's QAT budget: its number of stages x ``steps_per_stage``."""
    import jax

    from qat_jax import data as qdata
    from qat_jax import experiment
    from qat_jax import models as qmodels

    progressive = copy.deepcopy(base)  # the stages of the progressive schedule on base's model
    progressive.method = "progressive"
    info = qdata.dataset_info(base.dataset)
    model = experiment.create_model(progressive, info.num_classes)
    variables = qmodels.init_variables(model, jax.random.PRNGKey(0), (1, *info.image_shape))
    layers = experiment.binary_layers(progressive, qmodels.quantizable_layers(variables))
    controller = experiment.create_controller(progressive, layers)
    return controller.num_stages * int(base.schedule.steps_per_stage)


def changes_architecture(base: ml_collections.ConfigDict, method: str) -> bool:
    """Whether ``method`` builds another FP function than ``fp`` on ``base``'s model.

    ``reactnet`` adds a real-valued shortcut around every binary conv (on models with the
    ``binary_shortcut`` option, unless ``base`` already has it on); the parameters are the same,
    so the shared FP model would load, but it was not trained with the shortcuts.
    """
    from qat_jax import models as qmodels
    from qat_jax.train.methods import method_settings

    model = base.model
    return (
        method_settings(method).shortcut
        and not bool(model.get("binary_shortcut", False))
        and qmodels.has_option(model.name, "binary_shortcut")
    )


def _validate(config: ml_collections.ConfigDict) -> None:
    methods = list(config.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown methods {unknown} in --config.methods; choose from {sorted(METHODS)}"
        )
    if len(set(methods)) != len(methods):
        raise ValueError(f"--config.methods lists a method twice: {methods}")
    seeds = [int(s) for s in config.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--config.seeds must be distinct integers, got {list(config.seeds)}")
    if config.base.init != "train_fp":
        raise ValueError(
            "the comparison trains the FP model of every seed itself: leave base.init='train_fp'"
        )


def run_configs(
    config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[str, int, str, object]]:
    """``[(method, seed, run_dir, run_config)]`` in run order (each seed's ``fp`` first)."""
    _validate(config)
    budget = int(config.total_stage_steps) or stage_budget(config.base)
    out = []
    for seed in [int(s) for s in config.seeds]:
        fp_dir = os.path.join(workdir, f"seed{seed}", "fp")
        for method in ["fp"] + [m for m in config.methods if m != "fp"]:
            c = ml_collections.ConfigDict(config.base.to_dict())
            c.method = method
            c.seed = seed
            if method != "fp":
                # A method that changes the architecture (reactnet's shortcuts) cannot start from
                # the shared FP model (same parameters, another function): it trains its own.
                if not changes_architecture(config.base, method):
                    c.init = os.path.join(fp_dir, "teacher")
                c.schedule.total_stage_steps = budget
                acts_first = int(c.schedule.get("acts_first_steps", 0))
                if acts_first and method_settings(method).granularity == "two_step":
                    # Its own first step binarizes the activations already: the base's
                    # activations-first steps join its two stages, so the budget stays equal.
                    c.schedule.acts_first_steps = 0
                    c.schedule.total_stage_steps = budget + acts_first
            out.append((method, seed, os.path.join(workdir, f"seed{seed}", method), c))
    return out


def _record(c: ml_collections.ConfigDict) -> dict:
    return json.loads(c.to_json_best_effort(sort_keys=True))


def run_recorded(run_dir: str) -> dict:
    """Run (or resume) the run recorded in ``<run_dir>/compare_run.json`` in this process."""
    from qat_jax.train import train_and_evaluate

    with open(os.path.join(run_dir, "compare_run.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    return train_and_evaluate(config, run_dir)


def _launch(run_dir: str) -> None:
    """Run ``run_dir``'s recorded config in a child process (same interpreter and environment)."""
    proc = subprocess.run([sys.executable, "-m", "qat_jax.compare.run_one", run_dir], check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the run in {run_dir} failed (exit {proc.returncode}; its output is above); rerun "
            "the comparison to resume it from its last checkpoint"
        )


def _run_one(c: ml_collections.ConfigDict, run_dir: str, log) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    rec_path = os.path.join(run_dir, "compare_run.json")
    summary_path = os.path.join(run_dir, "summary.json")
    record = _record(c)
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            before = json.load(f)
        if before != record:
            diff = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k))
            raise ValueError(
                f"{run_dir} was run with a different config (keys {diff}): use a new --workdir "
                "or delete that run directory"
            )
    else:
        with open(rec_path, "w") as f:
            json.dump(record, f, indent=1)
    if os.path.exists(summary_path):
        log(f"  finished before: {run_dir}")
    else:
        t0 = time.time()
        _launch(run_dir)
        if not os.path.exists(summary_path):
            raise RuntimeError(
                f"{run_dir} stopped before the end (halt_after_step?); rerun to resume"
            )
        log(f"  ran {run_dir} in {time.time() - t0:.0f}s")
    with open(summary_path) as f:
        return json.load(f)


def run_comparison(config: ml_collections.ConfigDict, workdir: str, log=print) -> list[dict]:
    """Run (or resume) the comparison in ``workdir``; returns the per-run rows (also written)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    rows = []
    plan = run_configs(config, workdir)
    for i, (method, seed, run_dir, c) in enumerate(plan):
        log(f"[{i + 1}/{len(plan)}] {method} seed {seed}")
        s = _run_one(c, run_dir, log)
        rows.append(_row(method, seed, s))
    fp_by_seed = {r["seed"]: r["accuracy"] for r in rows if r["method"] == "fp"}
    for r in rows:
        r["gap_to_fp"] = r["accuracy"] - fp_by_seed[r["seed"]]
    write_results(workdir, rows, config, time.time() - t0)
    return rows


def _row(method: str, seed: int, s: dict) -> dict:
    acc = s["w1a1_accuracy"] if s["w1a1_accuracy"] is not None else s["final_accuracy"]
    return {
        "method": method,
        "seed": seed,
        "accuracy": float(acc),
        "binary_param_share": float(s.get("binary_param_share", 0.0)),
        "train_seconds": float(s["wall_seconds"]),
        "stage_accuracy": [float(x["accuracy"]) for x in s.get("stage_accuracy", [])],
        "stage_labels": [x["label"] for x in s.get("stage_accuracy", [])],
    }


def aggregate(rows: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """Mean and sample std over seeds per method, in ``methods`` order."""
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue

        def stats(key, rs=rs):
            v = np.asarray([r[key] for r in rs], np.float64)
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

        out.append(
            {
                "method": m,
                "seeds": len(rs),
                "accuracy": stats("accuracy"),
                "gap_to_fp": stats("gap_to_fp"),
                "binary_param_share": stats("binary_param_share")[0],
                "train_seconds": stats("train_seconds"),
            }
        )
    return out


def write_results(workdir: str, rows: Sequence[dict], config, seconds: float) -> None:
    methods = ["fp"] + [m for m in config.methods if m != "fp"]
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        cols = ["method", "seed", "accuracy", "gap_to_fp", "binary_param_share", "train_seconds"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in cols})
    agg = aggregate(rows, methods)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(_markdown(agg, config, seconds))
    _plot_bars(os.path.join(workdir, "comparison.png"), agg, config)
    _plot_stages(os.path.join(workdir, "stages.png"), rows, methods)


def _markdown(agg: Sequence[dict], config, seconds: float) -> str:
    b = config.base
    seeds = ", ".join(str(int(s)) for s in config.seeds)
    lines = [
        f"Model `{b.model.name}` ({b.model.get('variant', '')}, width {b.model.get('width_mult', '')})"
        f" on `{b.dataset.name}`; seeds {seeds}; mean ± std over seeds (sample std).",
        "",
        "| method | test accuracy (%) | gap to FP (points) | binary params | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for a in agg:
        acc, acc_sd = a["accuracy"]
        gap, gap_sd = a["gap_to_fp"]
        t, t_sd = a["train_seconds"]
        lines.append(
            f"| {a['method']} | {100 * acc:.2f} ± {100 * acc_sd:.2f} | "
            f"{100 * gap:+.2f} ± {100 * gap_sd:.2f} | {100 * a['binary_param_share']:.1f}% | "
            f"{t:.0f} ± {t_sd:.0f} |"
        )
    lines += [
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"this invocation took {seconds:.0f}s (runs finished before are not re-run).",
        "",
    ]
    return "\n".join(lines)


def _plot_bars(path: str, agg: Sequence[dict], config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(agg) + 2), 4))
    xs = np.arange(len(agg))
    means = [100 * a["accuracy"][0] for a in agg]
    sds = [100 * a["accuracy"][1] for a in agg]
    ax.bar(xs, means, yerr=sds, capsize=4, color=["gray"] + ["C0"] * (len(agg) - 1))
    for x, m in zip(xs, means, strict=True):
        ax.text(x, m + 0.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels([a["method"] for a in agg])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{config.base.model.name} on {config.base.dataset.name}: mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_stages(path: str, rows: Sequence[dict], methods: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    fp = [r["accuracy"] for r in rows if r["method"] == "fp"]
    if fp:
        ax.axhline(100 * np.mean(fp), color="gray", linestyle="--", label="fp")
    labels = None
    for m in methods:
        rs = [r for r in rows if r["method"] == m and m in PROGRESSIVE and r["stage_accuracy"]]
        if not rs:
            continue
        n = min(len(r["stage_accuracy"]) for r in rs)
        acc = 100 * np.mean([r["stage_accuracy"][:n] for r in rs], axis=0)
        ax.plot(np.arange(1, n + 1), acc, marker="o", label=m)
        labels = [lab.split(" [")[0].replace("stage ", "") for lab in rs[0]["stage_labels"][:n]]
    if labels:
        ax.set_xticks(np.arange(1, len(labels) + 1))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel("after stage (blocks bottom to top), then the final phase")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy after each stage (mean over seeds)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
