"""How a finished run's test accuracy depends on how its BN statistics are estimated.

Every evaluation of a run (after each stage and at the end) first re-estimates the BN statistics
on the first ``schedule.bn_batches`` batches of a fixed pool of train batches
(``qat_jax.train.calibrate.reestimate_bn``), either pooled into one batch or as the mean of
per-batch statistics (``schedule.bn_estimate``). This diagnostic takes the run's final state and
evaluates it on the whole test split with both estimates over the first ``n`` batches of that
pool for each ``--counts``, and over consecutive windows of ``--window`` batches (``[0, w)``,
``[w, 2w)``, ...), to show how much of a reported accuracy is the estimate and the batches.

Usage (the config and overrides of the run, as given to ``qat_jax.main``)::

    python benchmarks/bn_reestimation.py --config=configs/default.py --workdir=runs/default
    python benchmarks/bn_reestimation.py --config=configs/default.py --workdir=runs/x \\
        --config.optim.learning_rate=3e-3 --counts=1,4,16,64 --window=4

The run's folder is not modified: its checkpoints and FP model are read from a temporary copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import app, flags
from ml_collections import config_flags

_FLAGS = {}


def _define_flags() -> None:
    """The CLI's flags, defined only when run as a script (importing this module defines none)."""
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "the run's config file", lock_config=False
    )
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "folder of a finished run")
    _FLAGS["counts"] = flags.DEFINE_list("counts", ["1", "4", "16", "64"], "pool batch counts")
    _FLAGS["window"] = flags.DEFINE_integer("window", 4, "batches per window (0: no windows)")


def bn_accuracies(config, workdir: str, counts, window: int) -> dict:
    """``{'saved': acc, 'first': {n: row}, 'windows': {(start, stop): row}}`` of the run's final
    state (``saved``: with the statistics it was saved with; ``row``: ``{'pooled': acc,
    'per_batch': acc}``, one per ``schedule.bn_estimate``)."""
    from qat_jax.train import calibrate, trainer
    from qat_jax.train.timing import Timer

    counts = sorted({int(n) for n in counts})
    if not counts or counts[0] < 1 or window < 0:
        raise ValueError(f"counts must be >= 1 and window >= 0, got {counts} and {window}")
    config.unlock()
    n_pool = max(counts[-1], 4 * window)
    config.schedule.bn_batches = max(int(config.schedule.bn_batches), n_pool)
    config.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        for part in ("checkpoints", "teacher"):
            if os.path.isdir(os.path.join(workdir, part)):
                shutil.copytree(os.path.join(workdir, part), os.path.join(tmp, part))
        run = trainer.create_run(config, tmp)
        hstate = trainer.restore_or_start(run, Timer())
        if run.controller.entered < run.controller.final_index:
            raise ValueError(f"{workdir} holds no finished run (its last stage is not done)")
        b = run.boundaries

        def acc(batches):
            row = {}
            for name in calibrate.BN_ESTIMATES:
                pooled = name == "pooled"
                h = calibrate.reestimate_bn(hstate, b.bn_fn, batches, b.bn_momentum, pooled)
                row[name] = b.evaluate(h)["accuracy"]
            return row

        out = {"saved": b.evaluate(hstate)["accuracy"], "first": {}, "windows": {}}
        for n in counts:
            out["first"][n] = acc(b.calib_pool[:n])
        for start in range(0, 4 * window, window) if window else ():
            out["windows"][(start, start + window)] = acc(b.calib_pool[start : start + window])
        run.reporter.close()
        run.ckpt.close()
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = {k: v.value for k, v in _FLAGS.items()}
    if f["config"] is None or not f["workdir"]:
        raise app.UsageError("--config and --workdir are required")
    r = bn_accuracies(f["config"], os.path.abspath(f["workdir"]), f["counts"], f["window"])
    print(f"Test accuracy of {f['workdir']} with BN statistics from")
    print("| pool batches | pooled | mean of per-batch |")
    print("|---|---|---|")
    print(f"| as saved by the run | {100 * r['saved']:.2f} % | |")
    rows = [(f"[0, {n})", a) for n, a in r["first"].items()]
    rows += [(f"[{lo}, {hi})", a) for (lo, hi), a in r["windows"].items()]
    for label, a in rows:
        print(f"| {label} | {100 * a['pooled']:.2f} % | {100 * a['per_batch']:.2f} % |")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
