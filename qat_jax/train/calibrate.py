"""The pieces of a stage boundary, as functions of the host train state (forward passes only).

* :func:`calibrate_layers` -- input-dependent initialisation of the stage's layers
  (docs/method.md, "The transform" and "Progressive, aggregated schedule"): pass 1 sets each threshold ``tau`` to the per-channel input mean; pass 2 accumulates the second
  moment ``Sigma`` of the *binarized* input patches, then ``V0, lam = eigh(Sigma)``,
  ``rho`` so that ``s^2 ~ lam^gamma`` and ``P = 0``.
* :func:`materialize_layers` -- ``B``, ``alpha`` of completed blocks into the ``binary`` collection.
* :func:`apply_modes` -- writes ``w_mode``/``a_mode`` into ``qstate``.
* :func:`reestimate_bn` -- exact BN statistics over a few train batches with no parameter update.

The forward passes run through pmapped functions (``stats_fn``, the pmapped
:func:`qat_jax.train.steps.input_stats_step`, and ``bn_fn``, built by
:meth:`qat_jax.train.boundaries.Boundaries.create` with :mod:`qat_jax.train.parallel`), so
statistics are global over all devices and processes. The stage boundaries that call these
functions in order are :mod:`qat_jax.train.boundaries`.

Names: ``calib`` is only the collection of calibration results (``V0``, ``lam``); the statistics
a forward records are ``input_stats`` and the switch that adds ``xxT`` to them is
:data:`qat_jax.layers.RECORD_XXT` (see :mod:`qat_jax.layers`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax import binarize, transform
from qat_jax import layers as qlayers
from qat_jax.train import parallel
from qat_jax.train.state import TrainState
from qat_jax.tree import Path, get_path, set_path

__all__ = [
    "calibrate_layers",
    "materialize_layers",
    "apply_modes",
    "BN_ESTIMATES",
    "reestimate_bn",
    "measure_bn_momentum",
    "binary_weights_and_error",
    "activation_stats",
    "bn_shift",
]

# A channel whose binarized input is +1 less often than this (or -1 less often) is dead
# (saturated): ``sign(x - tau)`` is (almost) constant there and carries no information.
DEAD_FRACTION = 0.01


def _set_qstate(state: dict, layers: Iterable[Path], name: str, value: int) -> dict:
    for p in layers:
        state = set_path(state, ("qstate", *p, name), np.asarray(value, np.int32))
    return state


def apply_modes(hstate: TrainState, modes: Mapping[Path, tuple[int, int]]) -> TrainState:
    """Write ``{layer: (w_mode, a_mode)}`` into the (host) state's ``qstate``."""
    st = dict(hstate.state)
    for p, (w, a) in modes.items():
        st = set_path(st, ("qstate", *p, "w_mode"), np.asarray(w, np.int32))
        st = set_path(st, ("qstate", *p, "a_mode"), np.asarray(a, np.int32))
    return hstate.replace(state=st)


def _sum_stats(stats_fn: Callable, rvars, batches) -> dict:
    # Dispatch every batch before the first fetch, so the host never waits between batches.
    outs = [stats_fn(rvars, parallel.shard(images)) for images in batches]
    total = None
    for out in outs:
        stats = parallel.to_host(out)
        total = stats if total is None else jax.tree.map(np.add, total, stats)
    if total is None:
        raise ValueError("calibration needs at least one batch (schedule.calib_batches > 0)")
    return total


def calibrate_layers(
    hstate: TrainState,
    layers: Sequence[Path],
    stats_fn: Callable,
    batches: Callable[[], Iterable[np.ndarray]],
    qcfg: qlayers.QuantConfig,
    gamma: float,
    tau_init: str = "mean",
    tau_layers: Sequence[Path] | None = None,
) -> TrainState:
    """Calibrate ``layers`` on the current network (they are still in FP mode).

    Args:
      hstate: host (unreplicated) train state.
      layers: the stage's layer paths.
      stats_fn: pmapped :func:`qat_jax.train.steps.input_stats_step`
        (``(rvars, images) -> stats``).
      batches: callable returning a fresh iterable of per-device image batches
        ``[devices, b, H, W, C]`` (the same batches for both passes).
      qcfg: the model's quant config (``transform`` decides whether pass 2 runs).
      gamma: importance tempering exponent.
      tau_init: ``'mean'`` (per-channel input mean) or ``'zero'``.
      tau_layers: the layers whose threshold is initialised (default: ``layers``); a layer whose
        input is already binary keeps its trained ``tau`` (ReActNet's second step). With
        ``layers`` empty only the thresholds are set (a stage that binarizes inputs only).
    """
    if tau_init not in ("mean", "zero"):
        raise ValueError(f"quant.tau_init must be 'mean' or 'zero', got {tau_init!r}")
    params = dict(hstate.params)
    tau_layers = tuple(layers) if tau_layers is None else tuple(tau_layers)
    if not tau_layers:
        pass
    elif tau_init == "mean":
        stats = _sum_stats(stats_fn, parallel.replicate(hstate.variables), batches())
        for p in tau_layers:
            s = get_path(stats, p)
            tau = s["x_sum"] / np.maximum(s["count"], 1.0)
            params = set_path(params, ("quant", *p, "tau"), tau.astype(np.float32))
    else:
        for p in tau_layers:
            tau = get_path(params, ("quant", *p, "tau"))
            params = set_path(params, ("quant", *p, "tau"), np.zeros_like(tau))
    hstate = hstate.replace(params=params)
    if not qcfg.transform or not layers:
        return hstate

    st = _set_qstate(dict(hstate.state), layers, qlayers.RECORD_XXT, 1)
    stats = _sum_stats(stats_fn, parallel.replicate({**hstate.params, **st}), batches())
    st = _set_qstate(st, layers, qlayers.RECORD_XXT, 0)
    for p in layers:
        s = get_path(stats, p)
        sigma = s["xxT"] / np.maximum(s["n_patches"], 1.0)
        v0, lam, rho = _pca_and_importance(np.asarray(sigma, np.float64), gamma)
        st = set_path(st, (qlayers.CALIB, *p, "V0"), np.asarray(v0, np.float32))
        st = set_path(st, (qlayers.CALIB, *p, "lam"), np.asarray(lam, np.float32))
        params = set_path(params, ("quant", *p, "rho"), np.asarray(rho, np.float32))
        params = set_path(
            params, ("quant", *p, "P"), np.zeros_like(get_path(params, ("quant", *p, "P")))
        )
    return hstate.replace(params=params, state=st)


def _pca_and_importance(sigma: np.ndarray, gamma: float):
    """PCA and importance init on the host, in float64.

    numpy, not a jitted program: a jitted eigh compiled once per new layer shape, and those
    compiles were most of a stage boundary's warm-up (``benchmarks/bench_step.py``); LAPACK's
    float64 ``eigh`` is fast at these sizes (``d`` is at most 960 in MobileNetV2 at width 1.0).
    """
    v0, lam = transform.pca_init(sigma)
    return v0, lam, transform.init_rho(lam, float(gamma))


def _binary_weights_and_error(kernel, groups, quant_vars, calib_vars, qcfg, refine_sweeps):
    b, alpha, c = qlayers.layer_binary_weights(
        kernel, groups, quant_vars, calib_vars, qcfg, refine_sweeps
    )
    w = qlayers.kernel_to_matrix(kernel.astype(jnp.float32), groups)
    err = jnp.mean(binarize.output_error(w, alpha[..., None] * b, c))
    return b.astype(jnp.int8), alpha, err


@functools.cache
def _boundary_jit(fn, static_argnums):
    """``jax.jit`` for small programs that run a few times per stage, one compile per layer shape.

    On CPU they are compiled without LLVM's backend optimisation (as ``models.init_variables``
    does): their matmuls and factorisations are library calls either way, and the compile is most
    of their cost (``benchmarks/bench_run.py`` counts it under ``materialise`` and
    ``per_layer_metrics``).
    """
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fn, static_argnums=static_argnums, compiler_options=options)


def binary_weights_and_error(kernel, groups, quant_vars, calib_vars, qcfg, refine_sweeps=0):
    """``(B int8, alpha, relative output error)`` of one layer (``layer_binary_weights``).

    One jitted program for materialisation and the trainer's per-layer metrics, so each layer
    shape compiles once for both.
    """
    fn = _boundary_jit(_binary_weights_and_error, (1, 4, 5))
    return fn(kernel, int(groups), quant_vars, calib_vars, qcfg, int(refine_sweeps))


def materialize_layers(
    hstate: TrainState,
    layers: Sequence[Path],
    qcfg: qlayers.QuantConfig,
    refine_sweeps: int = 0,
) -> TrainState:
    """Compute ``B`` (int8 +-1) and ``alpha`` of ``layers`` and store them in ``binary``."""
    st = dict(hstate.state)
    for p in layers:
        # numpy like the per-layer metrics pass it: a device array would be another cache key.
        kernel = np.asarray(get_path(hstate.params, ("params", *p, "kernel")))
        b_old = get_path(st, ("binary", *p, "B"))
        groups = b_old.shape[0]
        b, alpha, _ = binary_weights_and_error(
            kernel,
            groups,
            get_path(hstate.params, ("quant", *p)),
            get_path(st, (qlayers.CALIB, *p), {}),
            qcfg,
            int(refine_sweeps),
        )
        st = set_path(st, ("binary", *p, "B"), np.asarray(b, np.int8))
        st = set_path(st, ("binary", *p, "alpha"), np.asarray(alpha, np.float32))
    return hstate.replace(state=st)


def measure_bn_momentum(bn_fn: Callable, rvars, images) -> float:
    """Measure the models' BN momentum ``m`` from one batch (``bn_fn`` is the pmapped bn_step)."""
    if not jax.tree.leaves(rvars.get("batch_stats", {})):
        return 0.0
    sharded = parallel.shard(images)
    s0 = parallel.to_host(bn_fn(rvars, sharded, 0.0))
    s1 = parallel.to_host(bn_fn(rvars, sharded, 1.0))
    diffs = np.concatenate(
        [np.ravel(b - a) for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1), strict=True)]
    )
    m = float(np.median(diffs))
    if not 0.0 <= m < 1.0:
        raise ValueError(f"could not measure the BN momentum (got {m})")
    return m


#: ``schedule.bn_estimate``: how :func:`reestimate_bn` measures BN statistics.
BN_ESTIMATES = ("pooled", "per_batch")


def reestimate_bn(
    hstate: TrainState,
    bn_fn: Callable,
    batches: Iterable[np.ndarray],
    momentum: float,
    pooled: bool = True,
) -> TrainState:
    """Replace ``batch_stats`` by statistics measured on ``batches`` (sharded image arrays).

    ``pooled=True``: one train-mode forward over all ``batches`` joined into one batch (per
    device: joined along the per-device batch axis; the models' BN reduces over devices). Every
    BN layer then gets the mean and variance of its input *in the network as evaluated* (all BN
    layers below it normalising with these same population statistics): the fixed point of
    eval-mode re-estimation, in one pass. Memory: one forward of the joined batch.

    ``pooled=False``: the mean over ``batches`` of each batch's train-mode statistics (PyTorch's
    ``update_bn``; memory of one batch). For a network with binary activations this is biased:
    in each batch the layers below are normalised with *that batch's* statistics, and the sign
    after them turns those per-batch fluctuations into a shift of every statistic above (on the
    default job it cost 3.6 points at 16 batches and 8.2 at 64, docs/results.md "BN
    re-estimation").
    """
    if not jax.tree.leaves(hstate.state.get("batch_stats", {})):
        return hstate
    batches = list(batches)
    if not batches:
        return hstate
    if pooled:
        batches = [np.concatenate(batches, axis=1)]
    rvars = parallel.replicate(hstate.variables)
    outs = [bn_fn(rvars, parallel.shard(images), 0.0) for images in batches]
    total = None
    for out in outs:
        stats = parallel.to_host(out)
        total = stats if total is None else jax.tree.map(np.add, total, stats)
    scale = 1.0 / (len(outs) * (1.0 - momentum))
    new_bs = jax.tree.map(lambda x: (x * scale).astype(np.float32), total)
    return hstate.replace(state={**hstate.state, "batch_stats": new_bs})


def activation_stats(
    hstate: TrainState, layers: Sequence[Path], stats_fn: Callable, batches: Iterable[np.ndarray]
) -> dict:
    """Per layer: how its input binarizes, ``sign(x - tau)``, on ``batches`` (diagnostics).

    One pass of ``stats_fn`` (the pmapped :func:`qat_jax.train.steps.input_stats_step`) over the
    current network. Returns ``{layer: {'ones': mean over channels of the fraction of +1,
    'dead': channels with < 1 % of +1, 'saturated': channels with > 99 % of +1}}``.
    """
    if not layers:
        return {}
    stats = _sum_stats(stats_fn, parallel.replicate(hstate.variables), batches)
    out = {}
    for p in layers:
        s = get_path(stats, p)
        frac = np.asarray(s["pos_sum"], np.float64) / max(float(s["count"]), 1.0)
        out[tuple(p)] = {
            "ones": float(np.mean(frac)),
            "dead": int(np.sum(frac < DEAD_FRACTION)),
            "saturated": int(np.sum(frac > 1.0 - DEAD_FRACTION)),
        }
    return out


def bn_shift(before: Mapping, after: Mapping, eps: float = 1e-5) -> dict:
    """How far BN re-estimation moved the running statistics (diagnostics).

    ``before``/``after``: ``batch_stats`` trees (each BN layer has ``mean`` and ``var``). Returns
    ``dmean``: the mean over all BN channels of ``|mean_after - mean_before|``, and ``dlogvar``:
    the mean of ``|log((var_after + eps) / (var_before + eps))|`` (``eps`` guards dead channels).
    """
    dmean, dlogvar = [], []

    def walk(b, a):
        if "mean" in b and "var" in b and not isinstance(b["mean"], Mapping):
            dmean.append(np.abs(np.ravel(a["mean"]) - np.ravel(b["mean"])))
            vb = np.ravel(b["var"]).astype(np.float64) + eps
            va = np.ravel(a["var"]).astype(np.float64) + eps
            dlogvar.append(np.abs(np.log(va / vb)))
            return
        for k, v in b.items():
            if isinstance(v, Mapping):
                walk(v, a[k])

    walk(before, after)
    if not dmean:
        return {"dmean": 0.0, "dlogvar": 0.0}
    return {
        "dmean": float(np.mean(np.concatenate(dmean))),
        "dlogvar": float(np.mean(np.concatenate(dlogvar))),
    }
