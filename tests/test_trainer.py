"""End to end: the whole schedule on a tiny config, freezing across stages, exact resume."""

import importlib.util
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qat_jax import transform
from qat_jax.data import prepare
from qat_jax.train import ConfigError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION), reason="needs Debian's dataset-fashion-mnist (CI installs it)"
)


def tiny_config(data_dir, **overrides):
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(ROOT, "configs/tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.dataset.data_dir = str(data_dir)
    c.keep_checkpoints = 100  # keep every stage-boundary checkpoint for inspection
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    prepare("fashion_mnist", FASHION, str(d))
    return d


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    summary = train_and_evaluate(tiny_config(data_dir), str(workdir))
    return workdir, summary


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
    ],
)
def test_bad_configs_fail_before_compute(data_dir, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train_and_evaluate(tiny_config(data_dir, **overrides), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
