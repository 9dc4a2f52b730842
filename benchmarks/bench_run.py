"""Where a whole training run's wall time goes: transitions share, their parts, and every compile.

Runs ``train_and_evaluate`` in this process (the default config unless ``--config``), with
``jax.monitoring`` listening to XLA backend compiles, and wraps the stage-boundary functions the
trainer calls (calibration, materialisation, BN re-estimation, evaluation, checkpoint writes, the
FP->QAT start) with timers, so that each part's seconds and compiles are attributed to it. The
wrappers only measure; they call the original functions unchanged.

Prints a table and writes JSON with

* ``summary.timing_seconds`` as the trainer wrote it and ``transitions / total``;
* per part: calls, seconds, compiles, compile seconds (a part nested in another, e.g. BN
  re-estimation inside a stage boundary, is counted in both: ``boundary`` is the whole);
* compiles outside the wrapped parts, by function name (train steps, per-layer metrics, ...).

Usage::

    python benchmarks/bench_run.py --json=runs/bench/run_default.json     # ~5 min on 2 cores
    python benchmarks/bench_run.py --quick                                # configs/tiny.py
    python benchmarks/bench_run.py --config=configs/default.py -- --config.method=xnor
    python benchmarks/bench_run.py --compilation_cache_dir=/tmp/xla   # twice: cold, then warm
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qat_jax.hostenv import allocator, tune_host  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Profiler:
    """Times wrapped functions and attributes backend compiles to the innermost active part."""

    def __init__(self):
        import jax

        self.parts: dict[str, dict] = {}
        self.stack: list[str] = []
        self.unattributed: dict[str, dict] = {}
        self.compiles: list[dict] = []
        self.cache_hits = 0
        jax.monitoring.register_event_time_span_listener(self._listen)
        jax.monitoring.register_event_listener(self._count_hits)

    def _count_hits(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def _listen(self, event, start, end, **kwargs):
        if event != "/jax/core/compile/backend_compile_duration":
            return
        name = str(kwargs.get("fun_name", "?"))
        rec = {"function": name, "seconds": round(end - start, 3), "part": None}
        if self.stack:
            rec["part"] = self.stack[-1]
            rec["within"] = " > ".join(self.stack)
            p = self.parts[self.stack[-1]]
            p["compiles"] += 1
            p["compile_s"] += end - start
        else:
            u = self.unattributed.setdefault(name, {"compiles": 0, "compile_s": 0.0})
            u["compiles"] += 1
            u["compile_s"] += end - start
        self.compiles.append(rec)

    def wrap(self, owner, attr: str, part: str):
        """Replace ``owner.attr`` by a timed wrapper (raises if it does not exist)."""
        fn = getattr(owner, attr)
        self.parts.setdefault(part, {"calls": 0, "seconds": 0.0, "compiles": 0, "compile_s": 0.0})

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            p = self.parts[part]
            self.stack.append(part)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                p["seconds"] += time.perf_counter() - t0
                p["calls"] += 1
                self.stack.pop()

        setattr(owner, attr, timed)
        return fn


def targets() -> list[tuple[object, str, str]]:
    """``(owner, attribute, part name)`` of the functions timed: public functions and methods of
    the modules the trainer calls them through (its stage boundaries, calibration, checkpoints)."""
    from qat_jax.train import boundaries, calibrate, checkpoint

    return [
        (boundaries.Boundaries, "start_qat", "fp_to_qat (teacher save + FP eval)"),
        (boundaries.Boundaries, "enter_stage", "boundary (materialise..BN, no checkpoint)"),
        (calibrate, "calibrate_layers", "calibrate"),
        (calibrate, "materialize_layers", "materialise"),
        (calibrate, "reestimate_bn", "bn_reestimate"),
        (boundaries.Boundaries, "evaluate", "evaluate"),
        (checkpoint.RunCheckpointer, "save", "checkpoint_save"),
        (checkpoint, "save_variables", "teacher_save"),
        (boundaries, "quant_layer_metrics", "per_layer_metrics (at logs)"),
    ]


def run(config_path: str, overrides: list[str], workdir: str | None) -> dict:
    import jax

    from qat_jax.train import trainer
    from qat_jax.train.config_files import load_config_file

    config = load_config_file(
        os.path.join(ROOT, config_path) if not os.path.isabs(config_path) else config_path
    )
    config.unlock()
    for ov in overrides:
        key, _, value = ov.removeprefix("--config.").partition("=")
        node = config
        *head, last = key.split(".")
        for h in head:
            node = node[h]
        cur = node[last]
        if isinstance(cur, bool):
            node[last] = value.lower() in ("1", "true", "yes")
        else:
            node[last] = type(cur)(value) if cur is not None else value
    config.progress = False
    prof = Profiler()
    saved = []
    for owner, attr, part in targets():
        saved.append((owner, attr, prof.wrap(owner, attr, part)))
    tmp = None
    if workdir is None:
        tmp = workdir = tempfile.mkdtemp(prefix="qat_bench_run_")
    elif os.path.exists(workdir):
        shutil.rmtree(workdir)
    la_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        summary = trainer.train_and_evaluate(config, workdir)
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t0
    timing = summary["timing_seconds"]
    total = summary["wall_seconds"]
    result = {
        "config": config_path,
        "overrides": overrides,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "loadavg_before": [round(x, 2) for x in la_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(wall, 2),
        "summary_wall_seconds": round(total, 2),
        "timing_seconds": timing,
        "transitions_share": round(timing.get("transitions", 0.0) / total, 4),
        # every checkpoint write (periodic, one per stage boundary, the last): billed on their own
        "checkpoints_share": round(timing.get("checkpoints", 0.0) / total, 4),
        "num_stages": summary["num_stages"],
        "fp_accuracy": summary["fp_accuracy"],
        "final_accuracy": summary["final_accuracy"],
        "parts": {
            k: {**v, "seconds": round(v["seconds"], 3), "compile_s": round(v["compile_s"], 3)}
            for k, v in prof.parts.items()
        },
        "unattributed_compiles": {
            k: {**v, "compile_s": round(v["compile_s"], 3)}
            for k, v in sorted(prof.unattributed.items(), key=lambda kv: -kv[1]["compile_s"])
        },
        "total_compiles": len(prof.compiles),
        "persistent_cache_hits": prof.cache_hits,
        # every compile of 0.1 s or more, in order, with the parts it happened in
        "compile_log": [c for c in prof.compiles if c["seconds"] >= 0.1],
        "total_compile_s": round(sum(c["seconds"] for c in prof.compiles), 2),
    }
    return result


def format_table(r: dict) -> str:
    t = r["timing_seconds"]
    lines = [
        f"== run {r['config']} {' '.join(r['overrides'])} on {r['device']}, load "
        f"{r['loadavg_before']} -> {r['loadavg_after']} ==",
        f"wall {r['summary_wall_seconds']:.1f}s: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
        + f"; transitions / total = {100 * r['transitions_share']:.1f}% (target <= 5%), "
        f"checkpoint writes / total = {100 * r['checkpoints_share']:.1f}%",
        f"compiles: {r['total_compiles']} taking {r['total_compile_s']:.1f}s; programs loaded from "
        f"the persistent cache: {r['persistent_cache_hits']} "
        f"({r.get('compilation_cache_dir') or 'cache off'})",
        f"{'part':<44}{'calls':>6}{'seconds':>9}{'compiles':>9}{'compile s':>10}",
    ]
    for k, v in r["parts"].items():
        lines.append(
            f"{k:<44}{v['calls']:>6}{v['seconds']:>9.2f}{v['compiles']:>9}{v['compile_s']:>10.2f}"
        )
    lines.append("compiles outside those parts, by function:")
    for k, v in r["unattributed_compiles"].items():
        lines.append(f"  {k:<42}{'':>6}{'':>9}{v['compiles']:>9}{v['compile_s']:>10.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="configs/tiny.py (seconds)")
    p.add_argument(
        "--compilation_cache_dir",
        default="none",
        help="JAX's persistent compilation cache as qat_jax.main uses it (default: off, a cold "
        "run; run twice with the same DIR for a warm one)",
    )
    p.add_argument("overrides", nargs="*", help="--config.key=value pairs (after --)")
    args = p.parse_args(argv)
    if args.quick:
        args.config = "configs/tiny.py"
    tune_host()  # before the XLA:CPU backend starts (qat_jax/hostenv.py)
    from qat_jax.train import compilation_cache

    cache = compilation_cache.enable(args.compilation_cache_dir)  # "none": a cold measurement
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args.config, args.overrides, args.workdir)
    result["compilation_cache_dir"] = cache
    result["allocator"] = allocator()  # tcmalloc or system (qat_jax/hostenv.py)
    print(format_table(result))
    if args.json:
        from bench_step import write_json  # the benchmarks' folder is on sys.path when run

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    from qat_jax import hostenv

    hostenv.start_entry_point()  # once more with tcmalloc, if installed (hostenv.py)
    main()
