"""End to end: the whole schedule on a tiny config, freezing across stages, exact resume."""

import importlib.util
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import subprocess_runs as R
from helpers import set_keys

from qat_jax import transform
from qat_jax.train import ConfigError, schedules, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.isdir(FASHION), reason="needs Debian's dataset-fashion-mnist (CI installs it)"
    ),
]


def tiny_config(data_dir, **overrides):
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(ROOT, "configs/tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.dataset.data_dir = str(data_dir)
    c.keep_checkpoints = 100  # keep every stage-boundary checkpoint for inspection
    return set_keys(c, **overrides)


@pytest.fixture(scope="module")
def data_dir(fashion_mnist_dir):
    return fashion_mnist_dir


@pytest.fixture(scope="session")
def full_run(fashion_mnist_dir, tmp_path_factory):
    """The tiny run every test of the schedule reads: trained once per test run (shared by the
    xdist workers through the file system)."""
    w = R.built_once(
        tmp_path_factory,
        "trainer_full_run",
        lambda d: train_and_evaluate(tiny_config(fashion_mnist_dir), d),
    )
    with open(os.path.join(w, "summary.json")) as f:
        return w, json.load(f)


def _restore(workdir, step):
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))


def _steps(workdir):
    return sorted(
        int(s) for s in os.listdir(os.path.join(str(workdir), "checkpoints")) if s.isdigit()
    )


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def test_whole_schedule_writes_outputs(full_run):
    workdir, summary = full_run
    assert summary["num_stages"] == 3  # two blocks + head conv, block granularity
    assert 0.0 <= summary["fp_accuracy"] <= 1.0 and 0.0 <= summary["w1a1_accuracy"] <= 1.0
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    assert on_disk["w1a1_accuracy"] == summary["w1a1_accuracy"]
    assert [s["label"].split(" [")[0] for s in on_disk["stage_accuracy"]] == [
        "stage 1/3",
        "stage 2/3",
        "stage 3/3",
        "final",
    ]
    assert os.path.getsize(os.path.join(workdir, "stages.png")) > 1000
    assert os.path.isdir(os.path.join(workdir, "teacher"))
    assert os.listdir(os.path.join(workdir, "tb"))
    kinds = {json.loads(line)["kind"] for line in open(os.path.join(workdir, "metrics.jsonl"))}
    assert {"train", "eval", "transition"} <= kinds
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    layer_keys = {k for r in records for k in r if k.startswith(("flip/", "binerr/"))}
    assert any(k.startswith("flip/") for k in layer_keys)
    assert any(k.startswith("binerr/") for k in layer_keys)


def test_frozen_weights_and_materialised_blocks_stay_bit_identical(full_run):
    workdir, _ = full_run
    cfg = tiny_config("unused")
    fp_steps, sps = cfg.fp.steps, cfg.schedule.steps_per_stage
    boundaries = [fp_steps + k * sps for k in range(4)]  # stages 0..2 and the final phase
    assert set(boundaries) <= set(_steps(workdir))
    states = [_restore(workdir, s) for s in boundaries] + [_restore(workdir, _steps(workdir)[-1])]
    qstate = states[-1]["state"]["qstate"]
    blocks = {}
    for name, node in qstate.items():
        if "block" in node:
            blocks.setdefault(int(node["block"]), []).append((name,))
        else:
            for sub, leaf in node.items():
                blocks.setdefault(int(leaf["block"]), []).append((name, sub))
    order = sorted(blocks)
    for k in range(1, len(states)):
        for j in order[: min(k, len(order))]:  # blocks quantized in stages before k
            for layer in blocks[j]:
                for later in states[k:]:
                    np.testing.assert_array_equal(
                        _get(states[k]["params"]["params"], (*layer, "kernel")),
                        _get(later["params"]["params"], (*layer, "kernel")),
                    )
                    for leaf in ("B", "alpha"):
                        np.testing.assert_array_equal(
                            _get(states[k]["state"]["binary"], (*layer, leaf)),
                            _get(later["state"]["binary"], (*layer, leaf)),
                        )
                assert int(_get(states[k]["state"]["qstate"], (*layer, "w_mode"))) == 2
    # Materialised B is strictly +-1.
    for layers in blocks.values():
        for layer in layers:
            b = _get(states[-1]["state"]["binary"], (*layer, "B"))
            assert set(np.unique(b)) <= {-1, 1}


def test_trained_transforms_stay_orthonormal_and_moved(full_run):
    workdir, _ = full_run
    final = _restore(workdir, _steps(workdir)[-1])
    moved = 0.0
    for path, p in jax.tree_util.tree_flatten_with_path(final["params"]["quant"])[0]:
        keys = [k.key for k in path]
        if keys[-1] != "P":
            continue
        v0 = _get(final["state"]["calib"], (*keys[:-1], "V0"))
        v = transform.trained_basis(v0, np.asarray(p))
        assert float(transform.orthonormality_error(v)) < 1e-5
        moved = max(moved, float(np.abs(p).max()))
    assert moved > 0.0  # the task loss did train P


def test_resume_mid_stage_is_bit_identical(full_run, data_dir, tmp_path):
    workdir_full, _ = full_run
    cfg = tiny_config(data_dir)
    halt = cfg.fp.steps + cfg.schedule.steps_per_stage + 1  # inside stage 2
    out = train_and_evaluate(tiny_config(data_dir, halt_after_step=halt), str(tmp_path))
    assert out == {"halted_at": halt}
    summary = train_and_evaluate(tiny_config(data_dir), str(tmp_path))
    a = _restore(workdir_full, _steps(workdir_full)[-1])
    b = _restore(tmp_path, _steps(tmp_path)[-1])
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert summary["w1a1_accuracy"] == full_run[1]["w1a1_accuracy"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"schedule.steps_per_stage": 0}, "steps_per_stage"),
        ({"schedule.granularity": "blocks"}, "granularity"),
        ({"batch_size": 12}, "batch_size"),
        ({"method": "bitatt"}, "unknown method"),
        ({"init": "/nonexistent/teacher"}, "does not exist"),
        ({"optim.schedule": "cosine"}, "optim.schedule"),
        ({"schedule.acts_first_steps": -1}, "acts_first_steps"),
        ({"schedule.acts_first_steps": 2, "method": "reactnet"}, "two_step"),
    ],
)
def test_bad_configs_fail_before_compute(data_dir, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train_and_evaluate(tiny_config(data_dir, **overrides), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def _records(workdir, kind):
    lines = open(os.path.join(str(workdir), "metrics.jsonl"))
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_diagnostics_are_logged(full_run):
    """``lr`` is the schedule's value at each logged step (FP and the global QAT cosine), the
    gradient split adds up, and every stage boundary reports BN shifts and activation shares."""
    workdir, _ = full_run
    cfg = tiny_config("unused")
    fp_steps = cfg.fp.steps
    qat_steps = 3 * cfg.schedule.steps_per_stage + cfg.schedule.final_steps
    lr_fp = schedules.warmup_cosine(
        cfg.fp.learning_rate, cfg.fp.warmup_steps, cfg.fp.final_lr_fraction, fp_steps
    )
    lr_qat = schedules.warmup_cosine(
        cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.optim.final_lr_fraction, qat_steps
    )
    train = _records(workdir, "train")
    assert train
    for r in train:  # the record at step s is written after the update of step s - 1
        c = r["step"] - 1
        expect = lr_fp(c) if c < fp_steps else lr_qat(c - fp_steps)
        assert r["lr"] == pytest.approx(float(expect), rel=1e-6), r["step"]
        assert r["grad_norm_trainable"] == pytest.approx(r["grad_norm"], rel=1e-6)
        assert r["grad_norm_frozen"] >= 0.0
    transitions = _records(workdir, "transition")
    assert len(transitions) == 4  # 3 stages and the final phase
    for r in transitions:
        assert r["bn_switch_dmean"] >= 0.0 and r["bn_switch_dlogvar"] >= 0.0
        ones = {k: v for k, v in r.items() if k.startswith("ones/")}
        assert ones and all(0.0 <= v <= 1.0 for v in ones.values())
        assert r["dead_channels"] == sum(v for k, v in r.items() if k.startswith("dead/"))
    assert all("bn_stage_end_dmean" in r for r in transitions[1:])
    # Stage 1 binarizes the inputs of block 0 only; the final phase those of every layer.
    assert len([k for k in transitions[0] if k.startswith("ones/")]) < len(
        [k for k in transitions[-1] if k.startswith("ones/")]
    )
    # Switching block 0 to binary moves its BN statistics.
    assert transitions[0]["bn_switch_dlogvar"] > 0.0


def test_acts_first_per_stage_run(data_dir, tmp_path):
    """Acts-first stage + per-stage learning rate end to end on the tiny config."""
    cfg = tiny_config(data_dir, **{"schedule.acts_first_steps": 2, "optim.schedule": "per_stage"})
    summary = train_and_evaluate(cfg, str(tmp_path))
    assert summary["num_stages"] == 4
    labels = [s["label"] for s in summary["stage_accuracy"]]
    assert labels[0].startswith("stage 1/4 [inputs of") and labels[-1] == "final"
    fp, sps, fin = cfg.fp.steps, cfg.schedule.steps_per_stage, cfg.schedule.final_steps
    segments = [2, sps, sps, sps, fin]
    lr = schedules.per_stage_schedule(
        segments, cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.optim.final_lr_fraction
    )
    qat_records = [r for r in _records(tmp_path, "train") if r["step"] > fp]
    assert qat_records
    for r in qat_records:
        assert r["lr"] == pytest.approx(float(lr(r["step"] - 1 - fp)), rel=1e-6)
    # A restart is visible: some logged lr is higher than the one logged before it.
    lrs = [r["lr"] for r in qat_records]
    assert any(b > a for a, b in zip(lrs, lrs[1:], strict=False))

    def qstate_of(state):
        out = {}
        for name, node in state["state"]["qstate"].items():
            for sub, leaf in [(None, node)] if "w_mode" in node else node.items():
                path = (name,) if sub is None else (name, sub)
                out[path] = (int(leaf["w_mode"]), int(leaf["a_mode"]))
        return out

    starts = [fp, fp + 2, fp + 2 + sps]  # the acts-first stage, block 0, block 1
    assert set(starts) <= set(_steps(tmp_path))
    acts, block0, block1 = (_restore(tmp_path, s) for s in starts)
    modes = qstate_of(acts)
    assert set(modes.values()) == {(0, 1)}  # every input binary, every weight FP
    b0 = [p for p, m in qstate_of(block0).items() if m == (1, 1)]
    assert b0 and all(p[0] == "block0" for p in b0)
    assert all(m == (0, 1) for p, m in qstate_of(block0).items() if p not in b0)
    # The acts-first stage set every threshold but calibrated no transform: a layer of block 1
    # keeps its initial V0 = I until its own weight stage.
    later = [p for p in modes if p[0] != "block0"]
    for p in later:
        v0 = _get(block0["state"]["calib"], (*p, "V0"))
        np.testing.assert_array_equal(v0, np.broadcast_to(np.eye(v0.shape[-1]), v0.shape))
    p = next(p for p in later if p[0] == "block1")
    assert not np.allclose(
        _get(block1["state"]["calib"], (*p, "V0")),
        np.eye(_get(block1["state"]["calib"], (*p, "V0")).shape[-1]),
    )
    assert np.any(_get(acts["params"]["quant"], (*p, "tau")) != 0)
