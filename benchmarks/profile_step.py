"""Where one train step's time goes: an XLA:CPU trace of the step, per op kind and per layer.

Builds the step exactly as ``bench_step.py`` does (the trainer's pmapped ``make_train_step``, state
donated, random inputs), warms it up, then runs ``--steps`` steps under ``jax.profiler.trace``
and reads the trace back: every op the runtime executed (a fusion, a dot, a conditional, ...)
with its duration. Each op is matched to its line in the optimized HLO (dumped by XLA into a
temporary folder) to recover what it came from, and the time per step is summed

* **per op kind**: the op's name without its number (``pad_slice_fusion``, ``ynn_fusion``,
  ``cond``, ...), split into the forward pass and the backward pass (``transpose(jvp(...))`` in
  the op's JAX name);
* **per layer**: the model scope in the op's JAX name (``block1/depthwise``, ``head_bn``, ...;
  ``?`` when XLA kept no name, e.g. a broadcast of a constant).

* **per layer kind**: the layers summed by what they are (``depthwise conv``, ``1x1 conv``,
  ``batch norm``, ``activation``, ...: ``layer_kind``), the kinds ``bench_vs_torch.py --profile``
  gives for PyTorch's step; ``--model=vs_torch`` profiles the plain model that
  ``bench_vs_torch.py`` times (no real-valued shortcuts, every conv binarizable) instead of the
  job's.

Op durations add up to more than the step's wall time when ops run in parallel and less when
the host waits; the shares are of the summed op time. The trace itself slows the step down: the
wall time printed is the untraced median. Compare kinds within one run; absolute times depend on
the machine (docs/performance.md says which machine each number came from).

Usage::

    python benchmarks/profile_step.py --setup=default --mode=fp
    python benchmarks/profile_step.py --setup=default --mode=bitat --stage=2 --top=30
    python benchmarks/profile_step.py --setup=tiny --mode=xnor --steps=1   # seconds
    python benchmarks/profile_step.py --setup=default --mode=fp --model=vs_torch
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_step  # noqa: E402  (jax-free: XLA's flags are set in profile(), before jax's)

# ``%name = shape opcode(... op_name="...")``; a tuple shape (``(f32[..], f32[..])``) has spaces.
_OP_LINE = re.compile(
    r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) [\w\-]+\(.*?op_name=\"([^\"]*)\""
)
_SCOPE = re.compile(r"^(stem|stem_bn|block\d+|head_conv|head_bn|head_act|classifier)$")
_HLO_NAME = re.compile(r"^[a-z][\w\-]*(\.\d+)?$")
_RUNTIME = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "SlinkyThreadPool", "Thunk")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """``{hlo op name: JAX op_name metadata}`` of an optimized HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _OP_LINE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def op_kind(name: str) -> str:
    """``'pad_slice_fusion.17'`` -> ``'pad_slice_fusion'``."""
    return re.sub(r"[._]\d+$", "", name)


def op_layer(jax_name: str | None) -> str:
    """The model scope of a JAX op name (``'block2/depthwise'``), ``'?'`` without one."""
    if not jax_name:
        return "?"
    parts = jax_name.split("/")
    for i, p in enumerate(parts):
        if _SCOPE.match(p):
            nxt = parts[i + 1] if i + 1 < len(parts) and p.startswith("block") else ""
            return f"{p}/{nxt}" if nxt and not nxt.startswith(("jit(", "add", "mul")) else p
    return "other"


#: ``layer_kind``'s kinds (``bench_step.STEP_KINDS``, shared with ``bench_vs_torch.py``).
LAYER_KINDS = bench_step.STEP_KINDS


def layer_kind(layer: str) -> str:
    """What a layer of ``op_layer`` is: ``'block2/depthwise'`` -> ``'depthwise conv'``,
    ``'block1/expand'`` or ``'head_conv'`` -> ``'1x1 conv'``, ``'stem'`` -> ``'other conv'``,
    ``'*_bn'`` -> ``'batch norm'``, ``'*_act'`` -> ``'activation'``, ``'classifier'`` ->
    ``'dense'``; ops outside the model's layers (the optimizer, the loss, ``'?'``) are
    ``'other'``. ``'copies'`` is PyTorch's only: XLA's copies belong to the layer they serve."""
    name = layer.split("/")[-1]
    if name == "depthwise":
        return "depthwise conv"
    if name in ("expand", "project", "head_conv"):
        return "1x1 conv"
    if name == "stem":
        return "other conv"
    if name.endswith("_bn"):
        return "batch norm"
    if name.endswith("_act"):
        return "activation"
    if name == "classifier":
        return "dense"
    return "other"


def aggregate(events, names: dict[str, str], steps: int) -> dict:
    """Sum trace ``events`` (complete events of the runtime's ops) per kind and per layer, ms/step."""
    kinds, layers = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e["name"].startswith(_RUNTIME):
            continue
        ms = e["dur"] / 1000.0 / steps
        if not _HLO_NAME.match(e["name"]):
            continue  # a Python-side or runtime annotation, not an HLO op
        jax_name = names.get(e["name"])
        phase = "bwd" if jax_name and "transpose(" in jax_name else "fwd"
        kinds[(phase, op_kind(e["name"]))] += ms
        layers[(phase, op_layer(jax_name))] += ms
    by_kind = collections.Counter()
    for (phase, layer), ms in layers.items():
        by_kind[(phase, layer_kind(layer))] += ms
    return {"kinds": kinds, "layers": layers, "by_kind": by_kind, "total_ms": sum(kinds.values())}


def read_trace(trace_dir: str) -> list[dict]:
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"no trace written under {trace_dir}")
    with gzip.open(paths[0]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def step_hlo(dump_dir: str) -> str:
    """The optimized HLO text of the train step (the module whose ops carry ``transpose(jvp``)."""
    best = ""
    for path in glob.glob(os.path.join(dump_dir, "*cpu_after_optimizations.txt")):
        with open(path) as f:
            text = f.read()
        if "transpose(jvp(" in text and len(text) > len(best):
            best = text
    if not best:
        raise RuntimeError(f"no train-step HLO found in {dump_dir}")
    return best


def format_table(title: str, rows: collections.Counter, total: float, top: int) -> str:
    lines = [f"| {title} | pass | ms/step | share |", "|---|---|---|---|"]
    for (phase, name), ms in rows.most_common(top):
        lines.append(f"| {name} | {phase} | {ms:.1f} | {100 * ms / total:.1f} % |")
    return "\n".join(lines)


def format_kinds(by_kind: collections.Counter, total: float) -> str:
    """The per-layer-kind table: forward, backward and both passes, ms per step."""
    lines = ["| layer kind | fwd ms | bwd ms | ms/step | share |", "|---|---|---|---|---|"]
    for kind in LAYER_KINDS:
        fwd, bwd = by_kind.get(("fwd", kind), 0.0), by_kind.get(("bwd", kind), 0.0)
        if fwd or bwd:
            lines.append(
                f"| {kind} | {fwd:.1f} | {bwd:.1f} | {fwd + bwd:.1f} | "
                f"{100 * (fwd + bwd) / total:.1f} % |"
            )
    return "\n".join(lines)


def profile(args) -> dict:
    dump = tempfile.mkdtemp(prefix="qat_jax_profile_")
    hlo_dir = os.path.join(dump, "hlo")
    # Must precede the first jax import of this process (the script owns its process).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={hlo_dir}"
    ).strip()
    import jax
    import numpy as np

    from qat_jax import hostenv
    from qat_jax.train import parallel

    hostenv.tune_host()
    if args.model == "vs_torch":
        import bench_vs_torch

        setup = bench_vs_torch.make_setup(args.setup, args.batch_size)
    else:
        setup = bench_step.load_setup(args.setup, args.batch_size)
    bench_step.set_conv_impl(setup, args.conv_impl)
    methods = ("fp", "xnor", "bitat") if args.mode == "bitat" else ("fp", "xnor")
    bench = bench_step.Bench(setup, methods=methods)
    if args.model == "vs_torch" and args.mode == "xnor":
        bench_vs_torch.set_thresholds(bench, "xnor")  # as bench_vs_torch.py times it
    k = args.stage if args.mode == "bitat" else 0
    hstate = bench.states["fp"] if args.mode == "fp" else bench.stage_state(args.mode, k)
    state = parallel.replicate(hstate)
    fn, teacher = bench.steps_fn[args.mode], bench.teachers[args.mode]

    def step(state):
        out = fn(state, bench.batch, bench.rng, teacher)
        jax.block_until_ready(out)
        return out[0]

    t0 = time.perf_counter()
    state = step(state)
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(args.warmup, 1) + args.steps):
        t0 = time.perf_counter()
        state = step(state)
        times.append(time.perf_counter() - t0)
    wall = float(np.median(times[args.warmup :]))
    trace_dir = os.path.join(dump, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state = step(state)
    try:
        agg = aggregate(read_trace(trace_dir), hlo_op_names(step_hlo(hlo_dir)), args.steps)
    finally:
        if not args.keep_dump:
            shutil.rmtree(dump, ignore_errors=True)
    label = args.mode + (f" stage {k}" if args.mode == "bitat" else "")
    return {
        "setup": args.setup,
        "mode": label,
        "batch_size": setup.batch_size,
        "first_step_s": first,
        "median_step_ms": 1000 * wall,
        "op_ms_per_step": agg["total_ms"],
        "kinds": {f"{p} {n}": v for (p, n), v in agg["kinds"].items()},
        "layers": {f"{p} {n}": v for (p, n), v in agg["layers"].items()},
        "layer_kinds": {f"{p} {n}": v for (p, n), v in agg["by_kind"].items()},
        "model": args.model,
        "_agg": agg,
        "dump_dir": dump if args.keep_dump else None,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", default="default", choices=("default", "tiny", "mnv2_c100"))
    p.add_argument("--mode", default="fp", choices=("fp", "xnor", "bitat"))
    bench_step.add_conv_impl_flag(p)
    p.add_argument(
        "--model",
        default="job",
        choices=("job", "vs_torch"),
        help="job: the setup's model as its config trains it; vs_torch: bench_vs_torch.py's",
    )
    p.add_argument("--stage", type=int, default=0, help="bitat: the stage whose step is traced")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps traced (and timed untraced)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=20, help="rows per table")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--keep_dump", action="store_true", help="keep the HLO dump and the trace")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        p.error("--steps and --batch_size must be >= 1, --warmup >= 0")
    if args.model == "vs_torch" and args.setup not in ("default", "tiny"):
        p.error("--model=vs_torch: --setup must be default or tiny (bench_vs_torch.py's setups)")
    if args.model == "vs_torch" and args.mode == "bitat":
        p.error("--model=vs_torch: --mode must be fp or xnor (bench_vs_torch.py's modes)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    r = profile(args)
    agg = r.pop("_agg")
    print(
        f"== {r['setup']} {r['mode']}, batch {r['batch_size']}: median step {r['median_step_ms']:.1f} ms"
        f" untraced, {r['op_ms_per_step']:.1f} ms of ops per traced step; first step"
        f" {r['first_step_s']:.1f} s =="
    )
    print(format_table("op kind", agg["kinds"], agg["total_ms"], args.top))
    print()
    print(format_table("layer", agg["layers"], agg["total_ms"], args.top))
    print()
    print(format_kinds(agg["by_kind"], agg["total_ms"]))
    if args.json:
        bench_step.write_json(args.json, r)
    return r


if __name__ == "__main__":
    from qat_jax import hostenv

    hostenv.start_entry_point()  # once more with tcmalloc, if installed (hostenv.py)
    main()
