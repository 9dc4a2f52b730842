"""Train-step benchmark: ``fp``, ``xnor`` and every ``bitat`` stage kind, timed in one process.

For one model setup it measures, after warm-up and interleaved over ``--rounds`` so that a change
of machine load hits every variant alike:

* the median wall time of one pmapped train step (the trainer's step: ``make_train_step`` under
  ``jax.pmap`` with the state donated) for ``fp`` (the FP phase: cross-entropy only), ``xnor``
  (every layer binarizing, ``C = I``, straight-through activation gradient, KD from the teacher)
  and ``bitat`` at chosen stages of the block schedule (``stage k``: block ``k`` binarizing with
  its trainable transform, the blocks below frozen binary, the rest FP) and in the final phase
  (everything frozen binary); the ratios ``bitat/xnor`` and ``xnor/fp``. Each method runs with the
  trainer's settings of that method (``method_setup``);
* XLA compiles (count, seconds; ``jax.monitoring`` backend-compile events) of the first call of
  each variant: a stage switch changes only data (modes, masks), so it must compile nothing;
* per stage: the wall time (and compiles) of calibration (``calibrate_layers``), of materialising
  the block that the stage completes, of one BN re-estimation and of one stage evaluation; each
  timed twice (first call, with its compiles, and again warm).

Setups: ``mnv2_c100`` (MobileNetV2-CIFAR width 1.0, 100 classes, batch 128, 32x32x3: the
``configs/cifar100_mobilenetv2.py`` model), ``default`` (``configs/default.py``: its model, batch
and image shape), ``tiny`` (``configs/tiny.py``; what ``--quick`` runs). Inputs are random
(data loading is not part of a step; see ``bench_pipeline.py``).

Usage::

    python benchmarks/bench_step.py --setup=default --json=runs/bench/step_default.json
    python benchmarks/bench_step.py --setup=mnv2_c100 --steps=3 --rounds=2 --stages=auto
    python benchmarks/bench_step.py --quick        # seconds: smoke run of the tiny setup
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What the ops of a train step are, by layer kind: ``profile_step.layer_kind`` (JAX) and
#: ``bench_vs_torch.torch_op_kind`` (PyTorch) sort into these, in this order, so their tables
#: compare row by row.
STEP_KINDS = (
    "depthwise conv",
    "1x1 conv",
    "other conv",
    "batch norm",
    "activation",
    "dense",
    "copies",
    "other",
)

#: ``qat_jax.ops.IMPLS`` (not imported here: the scripts set XLA flags before jax is imported;
#: ``tests/test_benchmarks.py`` keeps the two equal).
CONV_IMPLS = ("auto", "xla", "cpu", "cpu_ffi")


def add_conv_impl_flag(parser: argparse.ArgumentParser) -> None:
    """``--conv_impl``: the benchmarked model's conv implementation (default: the config's)."""
    parser.add_argument(
        "--conv_impl",
        default=None,
        choices=CONV_IMPLS,
        help="the model's conv implementation (default: the config's, 'auto')",
    )


def set_conv_impl(setup, impl: str | None) -> None:
    """Apply ``--conv_impl`` to a setup's config (``None``: keep the config's)."""
    if impl:
        setup.config.model.conv_impl = impl


SETUPS = {
    # name: (config file, batch size or None for the config's, num_classes, image shape)
    "mnv2_c100": ("configs/cifar100_mobilenetv2.py", 128, 100, (32, 32, 3)),
    "default": ("configs/default.py", None, 10, (32, 32, 1)),
    "tiny": ("configs/tiny.py", None, 10, (32, 32, 1)),
}


class Chrono:
    """Named wall-clock spans (big_vision's ``chrono`` style): ``with chrono.timing(name): ...``.

    Every span of ``name`` is appended to ``chrono.spans[name]`` (seconds, ``time.perf_counter``),
    so a loop of steps gives the list whose median is reported. The body must wait for its own
    results (``jax.block_until_ready``): the span ends when the body returns.
    """

    def __init__(self):
        self.spans: dict[str, list[float]] = collections.defaultdict(list)

    @contextlib.contextmanager
    def timing(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spans[name].append(time.perf_counter() - t0)

    def last(self, name: str) -> float:
        return self.spans[name][-1]

    def total(self, name: str) -> float:
        return sum(self.spans[name])


class CompileLog:
    """Collects XLA backend compiles (``jax.monitoring`` time spans) while it is active."""

    def __init__(self):
        import jax

        self.events: list[tuple[str, float, float]] = []
        self._event = "/jax/core/compile/backend_compile_duration"
        jax.monitoring.register_event_time_span_listener(self._listen)

    def _listen(self, event, start, end, **kwargs):
        if event == self._event:
            self.events.append((str(kwargs.get("fun_name", "?")), float(start), float(end)))

    def close(self) -> None:
        import jax

        jax.monitoring.unregister_event_time_span_listener(self._listen)

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> dict:
        ev = self.events[mark:]
        return {
            "compiles": len(ev),
            "compile_s": round(sum(e - s for _, s, e in ev), 3),
            "functions": sorted({n for n, _, _ in ev}),
        }


@dataclasses.dataclass
class Setup:
    name: str
    config: object
    batch_size: int
    num_classes: int
    image_shape: tuple


def load_setup(name: str, batch_size: int | None = None) -> Setup:
    from qat_jax.train.config_files import load_config_file

    path, batch, classes, shape = SETUPS[name]
    config = load_config_file(os.path.join(ROOT, path))
    config.unlock()
    bs = int(batch_size or batch or config.batch_size)
    return Setup(name, config, bs, classes, shape)


@dataclasses.dataclass
class MethodSetup:
    """What the trainer derives from a config for one method (``method_setup``)."""

    config: object  # the setup's config with ``method`` set to this method
    settings: object  # qat_jax.train.methods.MethodSettings
    quant: object  # qat_jax.layers.QuantConfig
    schedule: object  # qat_jax.train.stages.ScheduleConfig, one step per stage


def method_setup(config, method: str) -> MethodSetup:
    """``method`` on ``config`` exactly as the trainer sets it up (:mod:`qat_jax.experiment`).

    The quant config (transform, activation gradient, weight clip), the schedule (granularity,
    transform training) and, through ``config.method``, the model options of ``create_model``
    (RPReLU, shortcut) come from the builders the trainer uses; only the step counts of the
    schedule are the benchmark's (one step per stage and in the final phase).
    """
    from qat_jax import experiment
    from qat_jax.train.methods import method_settings

    mcfg = copy.deepcopy(config)
    mcfg.method = method  # create_model reads the method's model options from config.method
    s = mcfg.schedule
    s.steps_per_stage, s.final_steps, s.total_stage_steps = 1, 1, 0
    s.acts_first_steps = min(int(s.get("acts_first_steps", 0)), 1)
    return MethodSetup(
        mcfg,
        method_settings(method),
        experiment.quant_config(mcfg),
        experiment.schedule_config(mcfg),
    )


class Bench:
    """Builds models, states and pmapped functions of one setup, like the trainer does."""

    def __init__(self, setup: Setup, seed: int = 0, methods=("fp", "xnor", "bitat")):
        import jax
        import numpy as np

        from qat_jax import experiment
        from qat_jax import models as qmodels
        from qat_jax.train import parallel, steps

        self.setup = setup
        cfg = setup.config
        self.ndev = jax.local_device_count()
        if setup.batch_size % self.ndev:
            raise ValueError(f"batch {setup.batch_size} is not a multiple of {self.ndev} devices")
        rng = np.random.default_rng(seed)
        per_dev = setup.batch_size // self.ndev
        images = rng.standard_normal((self.ndev, per_dev, *setup.image_shape)).astype(np.float32)
        labels = rng.integers(0, setup.num_classes, (self.ndev, per_dev)).astype(np.int32)
        self.host_images = images
        self.batch = parallel.shard({"image": images, "label": labels})
        self.rng = parallel.replicate(jax.random.PRNGKey(seed))
        self.models, self.states, self.controllers, self.qcfgs = {}, {}, {}, {}
        self.steps_fn = {}
        tx = experiment.create_optimizer(cfg.optim, 1e-4)  # Adam at a constant rate
        self.methods = tuple(methods)
        for method in self.methods:
            ms = method_setup(cfg, method)
            settings, qcfg = ms.settings, ms.quant
            model = experiment.create_model(
                ms.config, setup.num_classes, qcfg, bn_axis_name=parallel.AXIS
            )
            variables = qmodels.init_variables(
                model, jax.random.PRNGKey(seed), (1, *setup.image_shape)
            )
            self.models[method] = model
            self.qcfgs[method] = qcfg
            self.states[method] = experiment.create_train_state(variables, tx)
            if settings.quantize:
                qlayer_list = experiment.binary_layers(
                    ms.config, qmodels.quantizable_layers(variables)
                )
                self.controllers[method] = experiment.create_controller(ms.config, qlayer_list)
            # As the trainer's: the FP phase is cross-entropy only on the static FP model; the
            # QAT steps run the KD teacher with the static FP model.
            lc = experiment.loss_config(ms.config, fp_phase=not settings.quantize)
            fp_model = qmodels.static_fp(model)
            step = (
                steps.make_train_step(model, tx, lc, teacher_model=fp_model)
                if settings.quantize
                else steps.make_train_step(fp_model, tx, lc)
            )
            self.steps_fn[method] = parallel.pmap(step, donate_argnums=(0,))
        # The KD teacher: the QAT model's own FP variables (every mode 0), as in the trainer.
        self.teachers = {
            m: parallel.replicate(
                {
                    **self.states[m].variables,
                    "qstate": jax.tree.map(np.zeros_like, self.states[m].state["qstate"]),
                }
            )
            for m in self.methods
            if m != "fp"
        }
        self.teachers["fp"] = None
        if "bitat" not in self.models:  # train steps only (e.g. bench_vs_torch.py: fp, xnor)
            return
        model = self.models["bitat"]
        self.stats_fn = parallel.pmap(lambda v, x: steps.input_stats_step(model, v, x))
        self.bn_fn = parallel.pmap(
            lambda v, x, base: steps.bn_step(model, v, x, base), in_axes=(0, 0, None)
        )
        self.eval_fn = parallel.pmap(lambda v, b: steps.eval_step(model, v, b))

    # -- states ----------------------------------------------------------------------------
    def stage_state(self, method: str, k: int):
        """Host state of ``method`` in stage ``k`` (``num_stages``: final); frozen B/alpha filled."""
        import numpy as np

        from qat_jax import layers as qlayers
        from qat_jax.train import calibrate
        from qat_jax.tree import get_path, set_path

        hstate = self.states[method]
        if method == "fp":
            return hstate
        c = self.controllers[method]
        modes = c.modes(k)
        hstate = calibrate.apply_modes(hstate, modes)
        st = dict(hstate.state)
        for p, (w, _) in modes.items():
            if w != qlayers.FROZEN:
                continue
            kernel = np.asarray(get_path(hstate.params, ("params", *p, "kernel")))
            groups = get_path(st, ("binary", *p, "B")).shape[0]
            wm = np.asarray(qlayers.kernel_to_matrix(kernel, groups))
            st = set_path(st, ("binary", *p, "B"), np.where(wm >= 0, 1, -1).astype(np.int8))
            st = set_path(st, ("binary", *p, "alpha"), np.mean(np.abs(wm), -1).astype(np.float32))
        mask = c.mask(k, hstate.params)
        mask = {k2: _to_np(v) for k2, v in mask.items()}
        return hstate.replace(state=st, mask=mask)

    def variants(self, stages: str) -> list[tuple[str, str, int]]:
        """``(label, method, stage index)`` of the variants to time."""
        c = self.controllers["bitat"]
        n = c.num_stages
        if stages == "all":
            ks = list(range(n))
        elif stages == "auto":
            ks = sorted({0, n // 2, self.heaviest_stage(), n - 1})
        else:
            ks = [int(s) for s in stages.split(",") if s]
        out = [(m, m, -1 if m == "fp" else 0) for m in ("fp", "xnor") if m in self.methods]
        out += [(f"bitat stage {k}", "bitat", k) for k in ks]
        out.append(("bitat final", "bitat", n))
        return out

    def heaviest_stage(self) -> int:
        """The stage whose binarizing layers have the largest transform size ``sum G * d^3``."""
        from qat_jax.tree import get_path

        c = self.controllers["bitat"]
        cost = []
        for s in c.stages:
            tot = 0
            for p in s.layers:
                g, d, _ = get_path(self.states["bitat"].params, ("quant", *p, "P")).shape
                tot += g * d**3
            cost.append(tot)
        return int(max(range(len(cost)), key=cost.__getitem__))

    def describe_stage(self, k: int) -> str:
        c = self.controllers["bitat"]
        if k >= c.num_stages:
            return "final (all frozen binary)"
        return c.describe(k)


def _to_np(tree):
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, tree)


def time_steps(bench: Bench, variants, steps: int, warmup: int, rounds: int, log: CompileLog):
    """Median step seconds per variant, interleaved over rounds; compiles of each first call.

    ``first[label]``: ``first_call_s`` (the first call alone: tracing, compiling, one step),
    ``first_calls_s`` (all ``max(warmup, 1)`` untimed calls) and the compiles they triggered.
    """
    import jax

    from qat_jax.train import parallel

    chrono = Chrono()
    rstates, first = {}, {}

    def step(label, method):
        rstates[label], m = bench.steps_fn[method](
            rstates[label], bench.batch, bench.rng, bench.teachers[method]
        )
        jax.block_until_ready(m)

    for label, method, k in variants:
        rstates[label] = parallel.replicate(bench.stage_state(method, k))
        mark = log.mark()
        with chrono.timing(f"warmup {label}"):
            for i in range(max(warmup, 1)):
                with chrono.timing(f"call {label}" if i == 0 else f"warm {label}"):
                    step(label, method)
        first[label] = {
            "first_call_s": round(chrono.last(f"call {label}"), 3),
            "first_calls_s": round(chrono.last(f"warmup {label}"), 3),
            **log.since(mark),
        }
    for _ in range(rounds):
        for label, method, _k in variants:
            for _ in range(steps):
                with chrono.timing(label):
                    step(label, method)
    rstates.clear()  # the donated step states
    times = {label: chrono.spans[label] for label, _, _ in variants}
    return {label: statistics.median(ts) for label, ts in times.items()}, first, times


def time_transitions(
    bench: Bench,
    stages: list[int],
    calib_batches: int,
    bn_batches: int,
    eval_examples: int,
    log: CompileLog,
) -> list[dict]:
    """Per stage: calibration, materialisation, BN re-estimation, stage evaluation (first, warm)."""
    import jax
    import numpy as np

    from qat_jax.train import calibrate, parallel

    cfg = bench.setup.config
    c = bench.controllers["bitat"]
    qcfg = bench.qcfgs["bitat"]
    pool = [bench.host_images] * max(calib_batches, bn_batches)
    n_eval = max(eval_examples // bench.setup.batch_size, 1)
    eval_batch = parallel.shard(
        {
            "image": bench.host_images,
            "label": np.zeros(bench.host_images.shape[:2], np.int32),
            "mask": np.ones(bench.host_images.shape[:2], np.float32),
        }
    )
    out = []

    def timed(fn):
        res = {}
        for tag in ("first", "warm"):
            mark = log.mark()
            t0 = time.perf_counter()
            val = fn()
            jax.block_until_ready(jax.tree.leaves(val))
            res[f"{tag}_s"] = round(time.perf_counter() - t0, 4)
            if tag == "first":
                res.update(log.since(mark))
                res.pop("functions")
        return val, res

    for k in stages:
        hstate = bench.stage_state("bitat", k)
        row = {"stage": k, "label": bench.describe_stage(k)}
        _, row["calibrate"] = timed(
            lambda h=hstate, k=k: (
                calibrate.calibrate_layers(
                    h,
                    c.stages[k].layers,
                    bench.stats_fn,
                    lambda: pool[:calib_batches],
                    qcfg,
                    float(cfg.quant.gamma),
                ).params
            )
        )
        if c.stages[k].completes:
            _, row["materialize"] = timed(
                lambda h=hstate, k=k: calibrate.materialize_layers(
                    h, c.stages[k].completes, qcfg, int(cfg.quant.refine_sweeps)
                ).state["binary"]
            )
        _, row["bn_reestimate"] = timed(
            lambda h=hstate: calibrate.reestimate_bn(h, bench.bn_fn, pool[:bn_batches], 0.9).state[
                "batch_stats"
            ]
        )

        def evaluate(h=hstate):
            rv = parallel.replicate(h.variables)
            tot = None
            for _ in range(n_eval):
                o = bench.eval_fn(rv, eval_batch)
                tot = o if tot is None else jax.tree.map(lambda a, b: a + b, tot, o)
            return parallel.to_host(tot)

        _, row["evaluate"] = timed(evaluate)
        row["evaluate"]["examples"] = n_eval * bench.setup.batch_size
        out.append(row)
    return out


def load_info() -> dict:
    la1, la5, la15 = os.getloadavg()
    return {"loadavg_1m": round(la1, 2), "loadavg_5m": round(la5, 2), "cpus": os.cpu_count()}


def write_json(path: str, result: dict) -> None:
    """Write a benchmark's result dict to ``path`` (its folder created), as every benchmark does."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def format_table(result: dict) -> str:
    lines = []
    s = result["setup"]
    lines.append(
        f"== train step: {s['name']} (batch {s['batch_size']}, {s['image_shape']}, "
        f"{s['num_classes']} classes), {result['device']}, load before {result['load_before']}, "
        f"after {result['load_after']} =="
    )
    lines.append(
        f"{'variant':<16}{'median s':>10}{'min s':>9}{'img/s':>8}{'x xnor':>8}{'x fp':>7}"
        f"{'min x xnor':>11}{'compiles':>9}{'compile s':>10}  stage"
    )

    def num(v, width, prec=3):
        return f"{v:>{width}.{prec}f}" if v is not None else f"{'-':>{width}}"

    for row in result["steps"]:
        lines.append(
            f"{row['label']:<16}{row['median_s']:>10.4f}{row['min_s']:>9.4f}"
            f"{row['images_per_s']:>8.0f}{num(row['vs_xnor'], 8)}{num(row['vs_fp'], 7)}"
            f"{num(row['min_vs_xnor'], 11)}{row['compiles']:>9d}{row['compile_s']:>10.2f}"
            f"  {row.get('stage', '')}"
        )
    r = result["ratios"]
    lines.append(
        f"bitat/xnor (medians): max {num(r['bitat_over_xnor_max'], 0)}, mean "
        f"{num(r['bitat_over_xnor_mean'], 0)} (target <= 1.10); by minima: max "
        f"{num(r['bitat_over_xnor_max_of_min'], 0)}; xnor/fp {num(r['xnor_over_fp'], 0)}; "
        f"compiles on stage switches: {r['compiles_on_stage_switch']}"
    )
    if result.get("transitions"):
        lines.append("== per stage transition parts: first call (compiles) / warm, seconds ==")
        lines.append(
            f"{'stage':<6}{'calibrate':>22}{'materialize':>22}{'bn re-est.':>22}{'evaluate':>22}"
        )

        def cell(d):
            if not d:
                return f"{'-':>22}"
            return f"{d['first_s']:>9.2f} ({d['compiles']:>2d}) /{d['warm_s']:>6.2f}"

        for t in result["transitions"]:
            lines.append(
                f"{t['stage']:<6}{cell(t.get('calibrate'))}{cell(t.get('materialize'))}"
                f"{cell(t.get('bn_reestimate'))}{cell(t.get('evaluate'))}"
            )
    return "\n".join(lines)


def run(args) -> dict:
    import jax

    log = CompileLog()
    setup = load_setup(args.setup, args.batch_size)
    if args.dtype:
        setup.config.model.dtype = args.dtype
    load_before = load_info()
    t0 = time.perf_counter()
    wanted = args.methods.split(",") + ["bitat"]
    methods = tuple(m for m in ("fp", "xnor", "bitat") if m in wanted)
    bench = Bench(setup, methods=methods)
    build_s = time.perf_counter() - t0
    variants = bench.variants(args.stages)
    med, first, raw = time_steps(bench, variants, args.steps, args.warmup, args.rounds, log)
    low = {label: min(ts) for label, ts in raw.items()}
    fp, xnor = med.get("fp"), med.get("xnor")

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 4)

    rows = []
    for label, method, k in variants:
        rows.append(
            {
                "label": label,
                "method": method,
                "stage_index": k,
                "stage": bench.describe_stage(k) if method == "bitat" else "",
                "median_s": round(med[label], 5),
                "images_per_s": round(setup.batch_size / med[label], 1),
                "min_s": round(low[label], 5),
                "vs_xnor": ratio(med[label], xnor),
                "vs_fp": ratio(med[label], fp),
                "min_vs_xnor": ratio(low[label], low.get("xnor")),
                "samples_s": [round(x, 5) for x in raw[label]],
                **first[label],
            }
        )
    bitat = [r for r in rows if r["method"] == "bitat"]
    switch_compiles = sum(r["compiles"] for r in bitat[1:])
    result = {
        "setup": {
            "name": setup.name,
            "batch_size": setup.batch_size,
            "image_shape": list(setup.image_shape),
            "num_classes": setup.num_classes,
            "dtype": str(setup.config.model.dtype),
            "num_stages": bench.controllers["bitat"].num_stages,
        },
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "backend": jax.default_backend(),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "build_s": round(build_s, 2),
        "steps": rows,
        "ratios": {
            "bitat_over_xnor_max": ratio(max(r["median_s"] for r in bitat), xnor),
            "bitat_over_xnor_mean": ratio(statistics.mean(r["median_s"] for r in bitat), xnor),
            "bitat_over_xnor_max_of_min": ratio(max(r["min_s"] for r in bitat), low.get("xnor")),
            "xnor_over_fp": ratio(xnor, fp),
            # Variants after the first bitat one differ only in data (modes, mask, B/alpha).
            "compiles_on_stage_switch": switch_compiles,
        },
    }
    if args.transitions != "none":
        c = bench.controllers["bitat"]
        ks = (
            list(range(c.num_stages))
            if args.transitions == "all"
            else [int(s) for s in args.transitions.split(",")]
        )
        cfg = setup.config
        result["transitions"] = time_transitions(
            bench,
            ks,
            int(cfg.schedule.calib_batches),
            int(cfg.schedule.bn_batches),
            int(args.eval_examples),
            log,
        )
    result["load_before"] = load_before
    result["load_after"] = load_info()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", default="default", choices=sorted(SETUPS))
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument(
        "--dtype", default=None, help="compute dtype (config.model.dtype), e.g. bfloat16"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (1st compiles)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default="fp,xnor,bitat", help="bitat is always timed")
    p.add_argument("--stages", default="all", help="'all', 'auto' or comma-separated indices")
    p.add_argument("--transitions", default="all", help="'all', 'none' or stage indices")
    p.add_argument("--eval_examples", type=int, default=500)
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--quick", action="store_true", help="tiny setup, 1 step, 1 round")
    p.add_argument(
        "--compilation_cache_dir",
        default="none",
        help="JAX's persistent compilation cache (default off: every program compiled here)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.setup, args.steps, args.warmup, args.rounds = "tiny", 1, 1, 1
        args.eval_examples = 16
    # Imported here, so that importing this module imports no JAX (bench_vs_torch.py's PyTorch
    # process uses its helpers).
    from qat_jax.hostenv import allocator, tune_host

    tune_host()  # before the XLA:CPU backend starts (qat_jax/hostenv.py)
    from qat_jax.train import compilation_cache

    cache = compilation_cache.enable(args.compilation_cache_dir)  # "none": a cold measurement
    result = run(args)
    result["compilation_cache_dir"] = cache
    result["allocator"] = allocator()  # tcmalloc or system (qat_jax/hostenv.py)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    from qat_jax import hostenv

    hostenv.start_entry_point()  # once more with tcmalloc, if installed (hostenv.py)
    main()
