"""qat_jax's train step against the same MobileNetV2-CIFAR in plain PyTorch eager, on this CPU.

One command runs two worker processes one after the other (this script with ``--_worker``), so
that neither framework's thread pools compete with the other's:

1. **JAX**: the trainer's model (``experiment.create_model``) and its pmapped train step
   (``steps.make_train_step``, state donated), built and timed by ``bench_step.py``'s ``Bench`` and
   ``time_steps`` exactly as ``bench_step.py`` times them, for the modes

   * ``fp``: the FP phase's step: cross-entropy, Adam;
   * ``xnor``: the ``xnor`` method's step: every conv but the stem binarizing, weights
     ``alpha * sign(W)`` (``alpha = mean|W|`` per output channel, STE clipped at
     ``quant.weight_clip`` times the row's rms), inputs ``sign(x - tau)`` with a learnable
     per-channel ``tau`` (STE ``1[|x - tau| <= 1]``, the method's ``act_grad='ste'``), stem and
     classifier FP, plus KD from the FP teacher (``loss.kd_weight``) whose forward runs in the
     step;

   then writes its variables, trainable-parameter counts and reference outputs for the parity
   check.
2. **PyTorch**: the same architecture written below in plain PyTorch eager (NCHW,
   ``torch.nn.functional``; the binarizers as ``torch.autograd.Function``), Adam, the same loss
   and KD teacher. It loads the JAX worker's initial variables, asserts the same trainable
   parameter count per mode (BN running statistics excluded on both sides), checks the logits
   against JAX's (train-mode BN, ``|torch - jax| <= --parity_tol * max|jax|``; ``--parity=grads``
   also compares the cross-entropy gradients of every trainable leaf), then times its step.

Both time ``--warmup`` untimed calls (the first one alone is reported: JAX's includes tracing and
XLA compiling, PyTorch's is eager) and ``--steps`` steps per round, interleaved over ``--rounds``;
reported: median step, images/s, first step and the ratio JAX/PyTorch per mode, as a markdown
table (``--json=PATH`` for everything). Both pin themselves to the same ``--threads`` CPUs
(``torch.set_num_threads``, and the process's CPU affinity for XLA's pool). Inputs are random.

Setups: ``default`` (``configs/default.py``'s model: width 0.5, 5 blocks, ``last_channel`` 256),
``issue`` (width 0.5 with the model's own stages and ``last_channel``: 700,202 parameters, the
model of issue #16), ``tiny`` (``configs/tiny.py``'s model; seconds). Image 32x32x1, 10 classes.

Usage::

    python benchmarks/bench_vs_torch.py --setup=default --json=runs/bench/vs_torch_default.json
    python benchmarks/bench_vs_torch.py --setup=issue --steps=10 --warmup=2
    python benchmarks/bench_vs_torch.py --setup=tiny --steps=2 --warmup=1   # smoke run
    python benchmarks/bench_vs_torch.py --setup=default --conv_impl=cpu_ffi   # compiled depthwise

``--profile`` also runs ``--steps`` more steps of each mode under ``torch.profiler`` and prints
PyTorch's step by op kind (self CPU ms per step: depthwise conv, 1x1 conv, batch norm, ...,
``torch_op_kind``), the kinds that ``profile_step.py --model=vs_torch`` gives for the JAX step.

Without PyTorch it prints ``torch not installed: skipping`` and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repository (qat_jax)
sys.path.insert(0, _HERE)  # bench_step

import bench_step  # noqa: E402
from bench_step import Chrono  # noqa: E402

MODES = ("fp", "xnor")
SETUPS = ("default", "issue", "tiny")
#: Logits of the two implementations: ``max|torch - jax| <= PARITY_TOL * max|jax|``.
PARITY_TOL = 1e-4
#: Gradients (``--parity=grads``), per leaf, relative to the leaf's largest JAX gradient or
#: ``GRAD_FLOOR`` of the largest JAX gradient of any leaf, whichever is larger.
GRAD_TOL = 1e-3
GRAD_FLOOR = 1e-3


# ---------------------------------------------------------------------------------------------
# Setup (JAX side)


def make_setup(name: str, batch_size: int) -> bench_step.Setup:
    """``bench_step``'s setup of that name; ``issue``: ``default`` with the model's own stages.

    The comparison is the plain model and plain XNOR whatever recipe switches the config turns
    on: no real-valued shortcut around the binary convs, every conv but the stem binarized in the
    ``xnor`` step, no inputs-only stage before it (the PyTorch twin implements exactly that).
    """
    if name not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {name!r}")
    setup = bench_step.load_setup("tiny" if name == "tiny" else "default", batch_size)
    setup.config.model.binary_shortcut = False
    setup.config.quant.fp_kinds = ()
    setup.config.schedule.acts_first_steps = 0
    if name == "issue":
        # Width 0.5 with MobileNetV2's own CIFAR stages and last_channel (1280): 700,202 params.
        setup.config.model.inverted_residual_setting = None
        setup.config.model.last_channel = None
        setup = dataclasses.replace(setup, name="issue")
    return setup


#: Range of the initial input thresholds of the binarized step (see :func:`set_thresholds`).
TAU_RANGE = (0.1, 0.6)


def set_thresholds(bench: bench_step.Bench, mode: str, seed: int = 0) -> None:
    """Draw ``mode``'s input thresholds ``tau`` per channel from ``U(TAU_RANGE)`` (seeded).

    With the initial ``tau = 0`` every ReLU6 output (``>= 0``, half of them exactly 0 after a
    train-mode BN) binarizes to +1: a 1x1 conv then sees a constant input, its BN divides rounding
    noise by ``sqrt(eps)`` and the next sign depends on that noise, so the two frameworks' logits
    diverge. The trainer's calibration (per-channel input means, eval-mode BN) leaves some
    thresholds at exactly 0 too, and costs one more compile of the whole network. Thresholds in
    ``TAU_RANGE`` split ReLU6 outputs and BN outputs alike into both signs. The step's cost does
    not depend on them.
    """
    from qat_jax.tree import get_path, set_path

    rng = np.random.default_rng(seed)
    h = bench.states[mode]
    params = dict(h.params)
    for p in bench.controllers[mode].layers:
        tau = np.asarray(get_path(params, ("quant", *p, "tau")))
        params = set_path(
            params, ("quant", *p, "tau"), rng.uniform(*TAU_RANGE, tau.shape).astype(np.float32)
        )
    bench.states[mode] = h.replace(params=params)


def mode_variant(mode: str) -> tuple[str, str, int]:
    """``(label, method, stage)`` of ``bench_step.time_steps``: xnor's only stage is stage 0."""
    return (mode, mode, -1 if mode == "fp" else 0)


def _flatten(tree, prefix=()) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out["/".join(prefix + (k,))] = np.asarray(v)
    return out


def mode_meta(setup: bench_step.Setup, mode: str, model) -> dict:
    """What the PyTorch twin of ``mode``'s JAX ``model`` is built from: the model's constructor
    settings, the method's quantizer settings (``method_setup``, as the trainer derives them) and
    the step's loss and optimizer settings (``bench_step.Bench``'s)."""
    cfg = setup.config
    ms = bench_step.method_setup(cfg, mode)
    quantize = bool(ms.settings.quantize)
    return {
        "arch": {
            "name": str(cfg.model.name),
            "stages": [list(row) for row in model.stages()],
            "width_mult": float(model.width_mult),
            "variant": model.variant,
            "last_channel": None if model.last_channel is None else int(model.last_channel),
            "round_nearest": int(model.round_nearest),
            "num_classes": int(model.num_classes),
            "in_channels": int(setup.image_shape[-1]),
            "dropout_rate": float(model.dropout_rate),
            "rprelu": bool(model.rprelu),
            "binary_shortcut": bool(model.binary_shortcut),
            "dtype": str(np.dtype(model.dtype)),
        },
        "binary": quantize,
        "transform": bool(ms.quant.transform),
        "weight_clip": ms.quant.weight_clip,
        "act_grad": ms.quant.act_grad,
        # As bench_step's Bench: the FP phase is cross-entropy only; QAT adds KD.
        "kd_weight": float(cfg.loss.kd_weight) if quantize else 0.0,
        "kd_temperature": float(cfg.loss.kd_temperature),
        "label_smoothing": float(cfg.loss.label_smoothing),
        "info_weight": float(cfg.loss.info_weight) if quantize else 0.0,
        "learning_rate": 1e-4,  # bench_step's create_optimizer(optim, 1e-4): Adam (no clip set)
    }


def jax_trainable_count(bench: bench_step.Bench, mode: str) -> int:
    """Entries of the leaves the step trains (mask 1): ``params`` (+ ``quant``'s ``tau``)."""
    h = bench.stage_state(*mode_variant(mode)[1:])
    sizes = _flatten(h.params)
    mask = _flatten(h.mask)
    return int(sum(v.size for k, v in sizes.items() if float(mask[k]) > 0))


def jax_reference(bench: bench_step.Bench, mode: str, images, labels=None):
    """Train-mode logits of the step's model on ``images`` (NHWC), and with ``labels`` the
    gradients of the mean cross-entropy w.r.t. every trainable leaf (``{'params', 'quant'}``).

    Same variables and modes as the step (``stage_state``), same BN (batch statistics, averaged
    over devices); no KD, no optimizer. Returns ``(logits [N, K], grads or None)`` as numpy.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from qat_jax.train import losses, parallel

    model = bench.models[mode]
    h = bench.stage_state(*mode_variant(mode)[1:])
    ndev = bench.ndev
    x = np.asarray(images, np.float32)
    if x.shape[0] % ndev:
        raise ValueError(f"parity batch {x.shape[0]} is not a multiple of {ndev} devices")
    x = x.reshape(ndev, -1, *x.shape[1:])
    y = None if labels is None else np.asarray(labels, np.int32).reshape(ndev, -1)

    def fwd(params, state, xs, ys):
        def loss_fn(p):
            logits, _ = model.apply({**p, **state}, xs, train=True, mutable=["batch_stats"])
            ce = jnp.mean(losses.cross_entropy(logits, ys)) if ys is not None else 0.0
            return ce, logits

        if ys is None:
            return loss_fn(params)[1], None
        (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return logits, lax.pmean(grads, parallel.AXIS)

    out = parallel.pmap(fwd)(
        parallel.replicate(h.params),
        parallel.replicate(h.state),
        parallel.shard(x),
        None if y is None else parallel.shard(y),
    )
    logits = np.asarray(out[0]).reshape(-1, np.asarray(out[0]).shape[-1])
    grads = None if labels is None else parallel.to_host(out[1])
    return logits, grads


def export_reference(bench, modes, images, labels, parity: str = "logits") -> tuple[dict, dict]:
    """``(meta, arrays)`` the PyTorch side needs: per mode the architecture, quantizer and loss
    settings, the JAX trainable count, the initial variables and (``parity`` ``'logits'`` or
    ``'grads'``; ``'none'``: nothing computed) the reference outputs on ``images``."""
    meta: dict = {"modes": {}}
    arrays: dict[str, np.ndarray] = {
        "parity/images": np.asarray(images, np.float32),
        "parity/labels": np.asarray(labels, np.int64),
    }
    for mode in modes:
        h = bench.stage_state(*mode_variant(mode)[1:])
        meta["modes"][mode] = {
            **mode_meta(bench.setup, mode, bench.models[mode]),
            "jax_trainable_params": jax_trainable_count(bench, mode),
        }
        variables = {
            "params": h.params["params"],
            "quant": h.params.get("quant", {}),
            "batch_stats": h.state["batch_stats"],
        }
        for k, v in _flatten(variables).items():
            arrays[f"{mode}/vars/{k}"] = v
        if parity == "none":
            continue
        logits, g = jax_reference(bench, mode, images, labels if parity == "grads" else None)
        arrays[f"{mode}/logits"] = logits
        if g is not None:
            for k, v in _flatten(g).items():
                arrays[f"{mode}/grads/{k}"] = v
    return meta, arrays


# ---------------------------------------------------------------------------------------------
# The PyTorch model (plain eager; imported only by the PyTorch worker and the tests)


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's channel rounding."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@functools.cache
def torch_modules():
    """The PyTorch classes (built on first use, so that importing this file needs no torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SignSTE(torch.autograd.Function):
        """``sign(x)`` (``sign(0) = +1``); backward ``g * 1[|x| <= clip]`` (qat_jax's ste_sign)."""

        @staticmethod
        def forward(ctx, x, clip):
            ctx.save_for_backward(x, clip)
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            x, clip = ctx.saved_tensors
            return torch.where(x.abs() <= clip, g, torch.zeros_like(g)), None

    class ApproxSign(torch.autograd.Function):
        """``sign(x)``; backward ``g * max(0, 2 - 2|x|)`` (Bi-Real's ApproxSign)."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)

    _one = torch.tensor(1.0)

    def xnor_weight(weight, clip):
        """``alpha * sign(W)``, ``alpha = sum(W * B) / sum(B * B) = mean|W|`` per output channel,
        the sign's STE clipped at ``clip * rms(W_o)`` (qat_jax's ``importance_binarize``, C = I)."""
        w = weight.reshape(weight.shape[0], -1)
        if clip is None:
            row_clip = torch.full_like(w, float("inf"))
        else:
            rms = w.detach().square().mean(-1, keepdim=True).sqrt()
            row_clip = (clip * rms).expand_as(w)
        b = SignSTE.apply(w, row_clip)
        alpha = (w * b).sum(-1) / (b * b).sum(-1).clamp_min(1e-12)
        return (alpha[:, None] * b).reshape(weight.shape)

    class BinaryConv2d(nn.Conv2d):
        """A bias-free conv with ``padding = k // 2``; ``binary``: input ``sign(x - tau)``
        (learnable ``tau`` per input channel) and weights :func:`xnor_weight`."""

        def __init__(self, cin, cout, k, stride=1, groups=1, binary=False, clip=3.0, act="ste"):
            super().__init__(cin, cout, k, stride, k // 2, groups=groups, bias=False)
            self.binary, self.clip, self.act = binary, clip, act
            if binary:
                self.tau = nn.Parameter(torch.zeros(cin))

        def forward(self, x):
            if not self.binary:
                return super().forward(x)
            z = x - self.tau.view(1, -1, 1, 1)
            if self.act == "ste":
                x = SignSTE.apply(z, _one)
            elif self.act == "approx":
                x = ApproxSign.apply(z)
            else:
                raise ValueError(f"act_grad {self.act!r}")
            w = xnor_weight(self.weight, self.clip)
            return F.conv2d(x, w, None, self.stride, self.padding, 1, self.groups)

    class InvertedResidual(nn.Module):
        """[expand 1x1, BN, ReLU6 ->] depthwise 3x3 / s, BN, ReLU6 -> project 1x1, BN (+ x)."""

        def __init__(self, cin, cout, stride, t, **conv):
            super().__init__()
            hidden = int(round(cin * t))
            self.has_expand = t != 1
            if self.has_expand:
                self.expand = BinaryConv2d(cin, hidden, 1, **conv)
                self.expand_bn = nn.BatchNorm2d(hidden)
            self.depthwise = BinaryConv2d(hidden, hidden, 3, stride, groups=hidden, **conv)
            self.depthwise_bn = nn.BatchNorm2d(hidden)
            self.project = BinaryConv2d(hidden, cout, 1, **conv)
            self.project_bn = nn.BatchNorm2d(cout)
            self.use_res = stride == 1 and cin == cout

        def forward(self, x):
            y = x
            if self.has_expand:
                y = F.relu6(self.expand_bn(self.expand(y)), inplace=True)
            y = F.relu6(self.depthwise_bn(self.depthwise(y)), inplace=True)
            y = self.project_bn(self.project(y))
            return y + x if self.use_res else y

    class MobileNetV2(nn.Module):
        """MobileNetV2 (torchvision's layout, CIFAR stem stride 1) with qat_jax's module names:
        ``stem``/``stem_bn``, ``block{i}.{expand,depthwise,project}[_bn]``, ``head_conv``/
        ``head_bn``, ``classifier``. ``binary``: every conv but the stem binarizes (xnor)."""

        def __init__(self, arch: dict, binary=False, clip=3.0, act="ste"):
            super().__init__()
            if arch["name"] != "mobilenetv2" or arch["rprelu"] or arch["binary_shortcut"]:
                raise NotImplementedError(f"no PyTorch twin of {arch}")
            if arch["dtype"] != "float32":
                raise NotImplementedError(f"dtype {arch['dtype']}")
            w, r = arch["width_mult"], arch["round_nearest"]
            conv = dict(binary=binary, clip=clip, act=act)
            ch = _make_divisible(32 * w, r)
            stem_stride = 2 if arch["variant"] == "imagenet" else 1
            self.stem = nn.Conv2d(arch["in_channels"], ch, 3, stem_stride, 1, bias=False)
            self.stem_bn = nn.BatchNorm2d(ch)
            i = 0
            for t, c, n, s in arch["stages"]:
                out = _make_divisible(c * w, r)
                for j in range(n):
                    blk = InvertedResidual(ch, out, s if j == 0 else 1, t, **conv)
                    self.add_module(f"block{i}", blk)
                    ch, i = out, i + 1
            self.num_blocks = i
            last = arch["last_channel"] or _make_divisible(1280 * max(1.0, w), r)
            self.head_conv = BinaryConv2d(ch, last, 1, **conv)
            self.head_bn = nn.BatchNorm2d(last)
            self.dropout = nn.Dropout(arch["dropout_rate"])
            self.classifier = nn.Linear(last, arch["num_classes"])

        def forward(self, x):
            x = F.relu6(self.stem_bn(self.stem(x)), inplace=True)
            for i in range(self.num_blocks):
                x = getattr(self, f"block{i}")(x)
            x = F.relu6(self.head_bn(self.head_conv(x)), inplace=True)
            return self.classifier(self.dropout(x.mean((2, 3))))

    return argparse.Namespace(
        SignSTE=SignSTE,
        ApproxSign=ApproxSign,
        xnor_weight=xnor_weight,
        BinaryConv2d=BinaryConv2d,
        MobileNetV2=MobileNetV2,
    )


def _torch_name(jax_key: str) -> str:
    """``params/block0/expand/kernel`` -> ``block0.expand.weight`` (and BN, tau, running stats)."""
    collection, *path, leaf = jax_key.split("/")
    name = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("quant", "tau"): "tau",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }[(collection, leaf)]
    return ".".join([*path, name])


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # HWIO -> OIHW (depthwise: (3, 3, 1, C) -> (C, 1, 3, 3))
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:  # dense [in, out] -> [out, in]
        return value.T
    return value


def build_torch_model(meta_mode: dict, arrays: dict, mode: str):
    """The PyTorch twin of ``mode``'s JAX model with the JAX worker's initial variables.

    Every PyTorch parameter and BN statistic must be set from a JAX variable of the same shape
    (and every JAX variable used): a stride, width or missing layer fails here.
    """
    import torch

    if meta_mode["transform"] or meta_mode["info_weight"]:
        raise NotImplementedError("the PyTorch twin has C = I and no info loss (xnor and fp)")
    tm = torch_modules()
    model = tm.MobileNetV2(
        meta_mode["arch"],
        binary=meta_mode["binary"],
        clip=meta_mode["weight_clip"],
        act=meta_mode["act_grad"],
    )
    sd = model.state_dict()
    prefix = f"{mode}/vars/"
    todo = {k for k in sd if not k.endswith("num_batches_tracked")}
    for key, value in arrays.items():
        if not key.startswith(prefix):
            continue
        jkey = key[len(prefix) :]
        if jkey.startswith("quant/") and not meta_mode["binary"]:
            continue  # the FP step has tau in the tree (untrained); the FP twin has none
        name = _torch_name(jkey)
        v = torch.tensor(_to_torch_layout(np.asarray(value)))
        if name not in sd or tuple(sd[name].shape) != tuple(v.shape):
            got = tuple(sd[name].shape) if name in sd else "missing"
            raise AssertionError(f"{jkey} {tuple(value.shape)}: PyTorch {name} is {got}")
        sd[name] = v
        todo.discard(name)
    if todo:
        raise AssertionError(f"PyTorch variables without a JAX counterpart: {sorted(todo)}")
    model.load_state_dict(sd)
    return model


def trainable_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _from_torch_grads(model) -> dict[str, np.ndarray]:
    """Gradients in JAX's layout and keys (``params/...``, ``quant/...``)."""
    out = {}
    for name, p in model.named_parameters():
        *path, leaf = name.split(".")
        kind = dict(weight="kernel", bias="bias", tau="tau")[leaf]
        collection = "quant" if leaf == "tau" else "params"
        g = p.grad.detach().numpy()
        if leaf == "weight" and g.ndim == 1:  # BN scale
            kind = "scale"
        elif g.ndim == 4:
            g = g.transpose(2, 3, 1, 0)
        elif g.ndim == 2:
            g = g.T
        out["/".join([collection, *path, kind])] = g
    return out


def scaled_error(actual, desired, floor: float = 0.0) -> float:
    """``max|actual - desired| / max(max|desired|, floor)``."""
    a = np.asarray(actual, np.float64)
    b = np.asarray(desired, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor, 1e-30))


def torch_parity(model, arrays: dict, mode: str) -> dict:
    """The model's train-mode logits (and, when the JAX side exported them, its cross-entropy
    gradients) against JAX's, as scaled errors. The model is left unchanged (it runs a copy)."""
    import copy

    import torch
    import torch.nn.functional as F

    m = copy.deepcopy(model).train()
    m.zero_grad(set_to_none=True)
    x = torch.from_numpy(np.ascontiguousarray(arrays["parity/images"].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(arrays["parity/labels"])
    logits = m(x)
    out = {"logits": scaled_error(logits.detach().numpy(), arrays[f"{mode}/logits"])}
    prefix = f"{mode}/grads/"
    if any(k.startswith(prefix) for k in arrays):
        F.cross_entropy(logits, y).backward()
        got = _from_torch_grads(m)
        ref = {k[len(prefix) :]: g for k, g in arrays.items() if k.startswith(prefix)}
        # A leaf whose exact gradient is 0 (the bias of a BN followed by a conv and a train-mode
        # BN) carries rounding noise of the other gradients' size: each leaf's scale is at least
        # GRAD_FLOOR of the largest gradient.
        floor = GRAD_FLOOR * max(float(np.max(np.abs(g))) for g in ref.values())
        errs = {}
        for jkey, g in ref.items():
            if jkey.startswith("quant/") and not np.any(g) and jkey not in got:
                continue  # the FP model's (untrained) tau
            errs[jkey] = scaled_error(got.pop(jkey), g, floor)
        if got:
            raise AssertionError(f"PyTorch gradients without a JAX counterpart: {sorted(got)}")
        worst = max(errs, key=errs.get)
        out.update(grads=errs[worst], grads_worst_leaf=worst)
    return out


def torch_train_step(model, teacher, optimizer, meta_mode: dict):
    """``step(x, y) -> loss``: CE (+ KD from ``teacher``'s eval-mode forward), backward, Adam."""
    import torch
    import torch.nn.functional as F

    kd_w, temp = meta_mode["kd_weight"], meta_mode["kd_temperature"]
    smoothing = meta_mode["label_smoothing"]

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        t_logits = None
        if kd_w:
            with torch.no_grad():
                t_logits = teacher(x)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if kd_w:
            t = t_logits / temp
            kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(logits / temp, -1))).sum(
                -1
            )
            loss = loss + kd_w * temp**2 * kl.mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


#: ``torch_op_kind``'s kinds (``bench_step.STEP_KINDS``, shared with ``profile_step.py``).
TORCH_OP_KINDS = bench_step.STEP_KINDS


def torch_op_kind(name: str, input_shapes) -> str:
    """The kind of a ``torch.profiler`` op (``key_averages(group_by_input_shape=True)`` row).

    Convolutions are told apart by their weight (``[O, I/groups, kh, kw]``: the second input of a
    forward conv op, the third of ``aten::convolution_backward``) and input (``[N, I, H, W]``: the
    first input, the second of the backward): ``kh*kw == 1`` is a 1x1 conv, ``I/groups == 1``
    with ``O == I > 1`` a depthwise conv (the grayscale stem, ``I = 1``, is not). Batch norm, the ReLU6 (``hardtanh``/``clamp``), the
    classifier's matmul and tensor copies are named kinds; the rest (Adam, the loss, autograd's
    bookkeeping) is ``'other'``.
    """
    n = name.lower()
    if "conv" in n:
        i = 2 if "backward" in n else 1
        w = list(input_shapes[i]) if len(input_shapes) > i else []
        x = list(input_shapes[i - 1]) if len(input_shapes) > i else []
        if len(w) != 4 or len(x) != 4:
            return "other conv"
        if w[2] * w[3] == 1:
            return "1x1 conv"
        return "depthwise conv" if w[1] == 1 and w[0] == x[1] > 1 else "other conv"
    if "batch_norm" in n:
        return "batch norm"
    if "hardtanh" in n or "clamp" in n or "relu" in n:
        return "activation"
    if n in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul"):
        return "dense"
    if n in ("aten::copy_", "aten::clone"):
        return "copies"
    return "other"


def torch_profile(step, x, y, steps: int) -> dict:
    """``step(x, y)`` ``steps`` times under ``torch.profiler``: self CPU ms per step by kind
    (``torch_op_kind``) and by op name (the 12 largest)."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step(x, y)
    kinds, ops = collections.Counter(), collections.Counter()
    for ev in prof.key_averages(group_by_input_shape=True):
        ms = ev.self_cpu_time_total / 1e3 / steps
        kinds[torch_op_kind(ev.key, ev.input_shapes)] += ms
        ops[ev.key] += ms
    return {
        "kinds": {k: round(kinds[k], 3) for k in TORCH_OP_KINDS if k in kinds},
        "top_ops": {k: round(v, 3) for k, v in ops.most_common(12)},
        "total_ms": round(sum(kinds.values()), 3),
    }


# ---------------------------------------------------------------------------------------------
# Workers


def _pin_cpus(threads: int) -> list[int]:
    """Restrict this process to ``threads`` of its CPUs (before any framework starts threads)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and threads < len(cpus):
        cpus = cpus[:threads]
        os.sched_setaffinity(0, cpus)
    return cpus


def _load_info() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timing_row(chrono: Chrono, label: str, batch: int, **extra) -> dict:
    ts = chrono.spans[label]
    med = statistics.median(ts)
    return {
        "median_s": round(med, 5),
        "min_s": round(min(ts), 5),
        "images_per_s": round(batch / med, 2),
        "samples_s": [round(t, 5) for t in ts],
        **extra,
    }


def jax_worker(args, outdir: str) -> dict:
    from qat_jax import hostenv

    cpus = _pin_cpus(args.threads)
    hostenv.tune_host()  # before the XLA:CPU backend starts
    from qat_jax.train import compilation_cache

    cache = compilation_cache.enable(args.compilation_cache_dir)  # "none": a cold measurement
    import jax

    from qat_jax import ops

    chrono = Chrono()
    load_before = _load_info()
    log = bench_step.CompileLog()
    setup = make_setup(args.setup, args.batch_size)
    bench_step.set_conv_impl(setup, args.conv_impl)
    modes = tuple(args.modes)
    with chrono.timing("build"):
        bench = bench_step.Bench(setup, methods=modes)
        for m in modes:
            if m != "fp":
                set_thresholds(bench, m)
    variants = [mode_variant(m) for m in modes]
    med, first, raw = bench_step.time_steps(
        bench, variants, args.steps, args.warmup, args.rounds, log
    )
    rows = {}
    for m in modes:
        rows[m] = {
            "median_s": round(med[m], 5),
            "min_s": round(min(raw[m]), 5),
            "images_per_s": round(setup.batch_size / med[m], 2),
            "samples_s": [round(t, 5) for t in raw[m]],
            **first[m],
        }
    load_after = _load_info()
    result = {
        "framework": "jax",
        "version": f"jax {jax.__version__}",
        "backend": jax.default_backend(),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "conv_impl": f"{setup.config.model.conv_impl} -> "
        f"{ops.resolve_impl(setup.config.model.conv_impl)}",
        "cpus": cpus,
        "compilation_cache_dir": cache,
        "allocator": hostenv.allocator(),
        "build_s": round(chrono.last("build"), 3),
        "steps": rows,
        "load_before": load_before,
        "load_after": load_after,
    }
    # Reference for the PyTorch worker (after the timing, so that it compiles nothing timed).
    n = args.parity_batch if args.parity != "none" else bench.ndev
    images = bench.host_images.reshape(-1, *setup.image_shape)
    if n > images.shape[0]:
        images = np.concatenate([images] * (-(-n // images.shape[0])))
    images = images[:n]
    labels = np.random.default_rng(1).integers(0, setup.num_classes, n)
    with chrono.timing("reference"):
        meta, arrays = export_reference(bench, modes, images, labels, args.parity)
    arrays["timing/images"] = bench.host_images.reshape(-1, *setup.image_shape)
    result["reference_s"] = round(chrono.last("reference"), 3)
    result["setup"] = {
        "name": setup.name,
        "batch_size": setup.batch_size,
        "image_shape": list(setup.image_shape),
        "num_classes": setup.num_classes,
    }
    meta["jax"] = result
    np.savez(os.path.join(outdir, "reference.npz"), **arrays)
    with open(os.path.join(outdir, "jax.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def torch_worker(args, outdir: str) -> dict:
    cpus = _pin_cpus(args.threads)
    import torch

    from qat_jax import hostenv

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chrono = Chrono()
    with open(os.path.join(outdir, "jax.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(outdir, "reference.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    setup = meta["jax"]["setup"]
    batch = int(setup["batch_size"])
    x = torch.from_numpy(np.ascontiguousarray(arrays["timing/images"].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(
        np.random.default_rng(0).integers(0, setup["num_classes"], batch).astype(np.int64)
    )
    load_before = _load_info()
    steps_fn, counts, parity = {}, {}, {}
    for mode in args.modes:
        mm = meta["modes"][mode]
        model = build_torch_model(mm, arrays, mode)
        counts[mode] = {"jax": mm["jax_trainable_params"], "torch": trainable_count(model)}
        if counts[mode]["jax"] != counts[mode]["torch"]:
            raise AssertionError(f"{mode}: trainable parameters differ: {counts[mode]}")
        if args.parity != "none":
            parity[mode] = torch_parity(model, arrays, mode)
            bad = {
                k: v
                for k, v in parity[mode].items()
                if (k == "logits" and v > args.parity_tol) or (k == "grads" and v > GRAD_TOL)
            }
            if bad:
                raise AssertionError(f"{mode}: PyTorch differs from JAX: {parity[mode]}")
        teacher = None
        if mm["kd_weight"]:
            # The KD teacher: the same initial variables, FP, eval-mode BN (the trainer's).
            teacher = build_torch_model({**mm, "binary": False}, arrays, mode).eval()
            teacher.requires_grad_(False)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=mm["learning_rate"])
        steps_fn[mode] = torch_train_step(model, teacher, opt, mm)
    first = {}
    for mode in args.modes:
        with chrono.timing(f"warmup {mode}"):
            for i in range(max(args.warmup, 1)):
                with chrono.timing(f"call {mode}" if i == 0 else f"warm {mode}"):
                    steps_fn[mode](x, y)
        first[mode] = {
            "first_call_s": round(chrono.last(f"call {mode}"), 3),
            "first_calls_s": round(chrono.last(f"warmup {mode}"), 3),
        }
    for _ in range(args.rounds):
        for mode in args.modes:
            for _ in range(args.steps):
                with chrono.timing(mode):
                    steps_fn[mode](x, y)
    profiles = {}
    if args.profile:
        for mode in args.modes:
            profiles[mode] = torch_profile(steps_fn[mode], x, y, args.steps)
    result = {
        "framework": "torch",
        "version": f"PyTorch {torch.__version__}",
        "allocator": hostenv.allocator(),
        "threads": torch.get_num_threads(),
        "cpus": cpus,
        "steps": {m: _timing_row(chrono, m, batch, **first[m]) for m in args.modes},
        "param_counts": counts,
        "parity": parity,
        "profile": profiles,
        "load_before": load_before,
        "load_after": _load_info(),
    }
    with open(os.path.join(outdir, "torch.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# ---------------------------------------------------------------------------------------------
# Driver


def combine(jax_meta: dict, torch_res: dict, args) -> dict:
    jx = jax_meta["jax"]
    rows = []
    for mode in args.modes:
        j, t = jx["steps"][mode], torch_res["steps"][mode]
        rows.append(
            {
                "mode": mode,
                "jax": j,
                "torch": t,
                "jax_over_torch": round(j["median_s"] / t["median_s"], 3),
            }
        )
    return {
        "setup": jx["setup"],
        "arch": jax_meta["modes"][args.modes[0]]["arch"],
        "modes": rows,
        "param_counts": torch_res["param_counts"],
        "parity": torch_res["parity"],
        "torch_profile": torch_res.get("profile") or {},
        "parity_batch": args.parity_batch if args.parity != "none" else None,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "jax": {k: v for k, v in jx.items() if k != "steps"},
        "torch": {
            k: v
            for k, v in torch_res.items()
            if k not in ("steps", "param_counts", "parity", "profile")
        },
    }


def format_table(r: dict) -> str:
    s, a, jx, tr = r["setup"], r["arch"], r["jax"], r["torch"]
    blocks = sum(row[2] for row in a["stages"])
    last = a["last_channel"] or _make_divisible(
        1280 * max(1.0, a["width_mult"]), a["round_nearest"]
    )
    lines = [
        f"== JAX vs PyTorch eager: setup {s['name']} (MobileNetV2-{a['variant']} width "
        f"{a['width_mult']}, {blocks} blocks, last_channel {last}), batch {s['batch_size']}, "
        f"{'x'.join(map(str, s['image_shape']))}, {s['num_classes']} classes ==",
        f"{r['threads']} threads each; median of {r['steps_per_round'] * r['rounds']} steps "
        f"after {r['warmup']} warm-up call(s); load average (1 min) {jx['load_before'][0]} "
        f"before, {tr['load_after'][0]} after; malloc: {jx.get('allocator', '?')} (JAX), "
        f"{tr.get('allocator', '?')} (PyTorch)",
        "",
        "| mode | framework | median step | img/s | first step (compile) | JAX / PyTorch |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["modes"]:
        j, t = row["jax"], row["torch"]
        lines.append(
            f"| {row['mode']} | qat_jax, {jx['version']} (`jax.pmap`, conv_impl={jx['conv_impl']})"
            f" | {1e3 * j['median_s']:.1f} ms | {j['images_per_s']:.1f} | "
            f"{j['first_call_s']:.1f} s (XLA compile {j['compile_s']:.1f} s) | "
            f"**{row['jax_over_torch']:.2f}** |"
        )
        lines.append(
            f"| {row['mode']} | {tr['version']} eager ({tr['threads']} threads) | "
            f"{1e3 * t['median_s']:.1f} ms | {t['images_per_s']:.1f} | {t['first_call_s']:.2f} s |"
            " 1.00 |"
        )
    lines.append("")
    counts = ", ".join(
        f"{m} {c['jax']:,} (JAX) = {c['torch']:,} (PyTorch)" for m, c in r["param_counts"].items()
    )
    lines.append(f"trainable parameters (BN statistics excluded): {counts}")
    if r["parity"]:
        par = "; ".join(
            f"{m}: logits {p['logits']:.2g}"
            + (f", grads {p['grads']:.2g} (worst {p['grads_worst_leaf']})" if "grads" in p else "")
            for m, p in r["parity"].items()
        )
        lines.append(
            f"parity, max|PyTorch - JAX| / max|JAX| on {r['parity_batch']} images (train-mode BN): "
            f"{par}"
        )
    for mode, prof in r.get("torch_profile", {}).items():
        lines += [
            "",
            f"PyTorch's {mode} step by op kind (torch.profiler, self CPU time per step, "
            f"{prof['total_ms']:.1f} ms in all):",
            "",
            "| op kind | ms/step | share |",
            "|---|---|---|",
        ]
        for kind, ms in prof["kinds"].items():
            lines.append(f"| {kind} | {ms:.1f} | {100 * ms / prof['total_ms']:.1f} % |")
    return "\n".join(lines)


def _worker_argv(args, worker: str, outdir: str) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        f"--setup={args.setup}",
        f"--batch_size={args.batch_size}",
        f"--modes={','.join(args.modes)}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--rounds={args.rounds}",
        f"--threads={args.threads}",
        f"--parity={args.parity}",
        f"--parity_batch={args.parity_batch}",
        f"--parity_tol={args.parity_tol}",
        f"--compilation_cache_dir={args.compilation_cache_dir}",
        *(["--profile"] if args.profile else []),
        *([f"--conv_impl={args.conv_impl}"] if args.conv_impl else []),
        f"--_worker={worker}",
        f"--_dir={outdir}",
    ]


def parse_args(argv=None):
    default_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", default="default", choices=SETUPS)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--modes", default="fp,xnor", help="comma-separated: fp, xnor")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per mode (1st compiles)")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the modes (interleaved)")
    p.add_argument("--threads", type=int, default=default_threads, help="CPUs for each framework")
    p.add_argument(
        "--parity",
        default="logits",
        choices=("logits", "grads", "none"),
        help="check PyTorch against JAX: train-mode logits (+ CE gradients with 'grads')",
    )
    p.add_argument("--parity_batch", type=int, default=8)
    p.add_argument("--parity_tol", type=float, default=PARITY_TOL)
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument(
        "--compilation_cache_dir",
        default="none",
        help="JAX's persistent compilation cache (default off: the first step compiles)",
    )
    bench_step.add_conv_impl_flag(p)
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print PyTorch's step by op kind (torch.profiler; profile_step.py: JAX's)",
    )
    p.add_argument("--_worker", default=None, choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = tuple(m for m in args.modes.split(",") if m)
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes must be a subset of {','.join(MODES)}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args._worker == "jax":
        return jax_worker(args, args._dir)
    if args._worker == "torch":
        return torch_worker(args, args._dir)
    try:
        import torch  # noqa: F401
    except (ImportError, OSError):
        print("torch not installed: skipping")
        return None
    from qat_jax import hostenv

    # Both workers on the same malloc, the one qat_jax's entry points use (tcmalloc when
    # installed; QAT_JAX_ALLOCATOR=system keeps glibc's): it moves both frameworks' steps alike.
    env = hostenv.allocator_env(os.environ, loaded=hostenv.allocator()) or dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bench_vs_torch_") as d:
        for worker in ("jax", "torch"):
            rc = subprocess.run(_worker_argv(args, worker, d), env=env).returncode
            if rc:
                print(f"bench_vs_torch: the {worker} worker failed (exit {rc})", file=sys.stderr)
                sys.exit(rc)
        with open(os.path.join(d, "jax.json")) as f:
            jax_meta = json.load(f)
        with open(os.path.join(d, "torch.json")) as f:
            torch_res = json.load(f)
    result = combine(jax_meta, torch_res, args)
    print(format_table(result))
    if args.json:
        bench_step.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
