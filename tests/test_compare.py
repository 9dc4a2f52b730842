"""The comparison runner: plan, equal budgets, outputs, resume; the methods' definitions."""

import csv
import dataclasses
import os

import ml_collections
import numpy as np
import pytest

from qat_jax import compare
from qat_jax.train.config_files import load_config_file
from qat_jax.train.methods import METHODS, method_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"


def _compare_config(data_dir, methods, seeds=(0,)):
    c = ml_collections.ConfigDict()
    c.base = load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    c.base.unlock()
    c.base.dataset.data_dir = str(data_dir)
    c.methods = tuple(methods)
    c.seeds = tuple(seeds)
    c.total_stage_steps = 0
    return c


def test_progressive_and_bitat_differ_only_in_the_transform():
    a = dataclasses.asdict(method_settings("progressive"))
    b = dataclasses.asdict(method_settings("bitat"))
    assert {k for k in a if a[k] != b[k]} == {"transform", "train_transform"}
    assert b["transform"] and b["train_transform"] and not a["transform"]
    assert set(METHODS) == {"fp", "xnor", "reactnet", "progressive", "bitat_fixed", "bitat"}


def test_plan_shares_one_teacher_per_seed_with_equal_budgets(tmp_path):
    c = _compare_config(tmp_path, ["xnor", "reactnet", "progressive", "bitat"], seeds=(3, 4))
    plan = compare.run_configs(c, str(tmp_path))
    assert [(m, s) for m, s, _, _ in plan][:5] == [
        ("fp", 3),
        ("xnor", 3),
        ("reactnet", 3),
        ("progressive", 3),
        ("bitat", 3),
    ]
    # tiny: two blocks + head_conv = 3 block stages of 3 steps.
    budget = compare.stage_budget(c.base)
    assert budget == 3 * c.base.schedule.steps_per_stage
    for method, seed, run_dir, rc in plan:
        assert rc.seed == seed and rc.method == method
        assert run_dir == os.path.join(str(tmp_path), f"seed{seed}", method)
        if method in ("fp", "reactnet"):  # reactnet's shortcuts need their own FP model
            assert rc.init == "train_fp"
            assert rc.model.binary_shortcut is False  # the method turns it on when built
        if method != "fp":
            assert rc.schedule.total_stage_steps == budget
        if method not in ("fp", "reactnet"):
            assert rc.init == os.path.join(str(tmp_path), f"seed{seed}", "fp", "teacher")
            assert rc.schedule.final_steps == c.base.schedule.final_steps
    # The run configs of progressive and bitat are the same but for the method name.
    prog = next(rc for m, s, _, rc in plan if m == "progressive" and s == 3).to_dict()
    bitat = next(rc for m, s, _, rc in plan if m == "bitat" and s == 3).to_dict()
    assert {k for k in prog if prog[k] != bitat[k]} == {"method"}


def test_activations_first_steps_join_reactnets_two_steps_with_an_equal_budget(tmp_path):
    """reactnet's first step binarizes the activations already: with acts_first_steps in the
    base, it gets those steps inside its two stages instead, and every QAT method trains for the
    same number of steps in all; the built stage controllers say so."""
    import jax

    from qat_jax import experiment
    from qat_jax import models as qmodels

    c = _compare_config(tmp_path, ["xnor", "reactnet", "bitat"])
    c.base.schedule.acts_first_steps = 4
    plan = compare.run_configs(c, str(tmp_path))
    budget = compare.stage_budget(c.base)
    totals = {}
    for method, _, _, rc in plan:
        if method == "fp":
            continue
        if method == "reactnet":
            assert rc.schedule.acts_first_steps == 0
            assert rc.schedule.total_stage_steps == budget + 4
        else:
            assert rc.schedule.acts_first_steps == 4
            assert rc.schedule.total_stage_steps == budget
        model = experiment.create_model(rc, 10)
        variables = qmodels.init_variables(model, jax.random.PRNGKey(0), (1, 32, 32, 1))
        layers = experiment.binary_layers(rc, qmodels.quantizable_layers(variables))
        totals[method] = experiment.create_controller(rc, layers).total_steps
    assert len(set(totals.values())) == 1, totals


@pytest.mark.parametrize(
    "field, value, match",
    [("methods", ("xnor", "bogus"), "unknown methods"), ("seeds", (1, 1), "distinct")],
)
def test_bad_comparison_configs_are_rejected(tmp_path, field, value, match):
    c = _compare_config(tmp_path, ["xnor"])
    c[field] = value
    with pytest.raises(ValueError, match=match):
        compare.run_configs(c, str(tmp_path))


def test_cli_is_the_package_main_and_bad_config_is_one_line(tmp_path):
    """``python -m qat_jax.compare`` is the CLI (``qat_jax/compare/__main__.py``) of the library
    ``qat_jax.compare``; a bad setting is a one-line error, exit code 2, before any run."""
    import subprocess
    import sys

    work = tmp_path / "cmp"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "qat_jax.compare",
            "--config=configs/compare_default.py",
            f"--workdir={work}",
            "--config.methods=('xnor','bogus')",
            "--compilation_cache_dir=none",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: unknown methods ['bogus']")
    assert not (work / "seed0").exists()
    assert callable(compare.run_comparison) and callable(compare.run_recorded)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION), reason="needs Debian's dataset-fashion-mnist")
def test_runner_writes_results_and_resumes_without_rerunning(
    tmp_path, monkeypatch, fashion_mnist_dir
):
    data_dir = fashion_mnist_dir
    c = _compare_config(data_dir, ["xnor", "bitat"])
    work = tmp_path / "cmp"
    rows = compare.run_comparison(c, str(work), log=lambda *_: None)
    assert [(r["method"], r["seed"]) for r in rows] == [("fp", 0), ("xnor", 0), ("bitat", 0)]

    with open(work / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == ["fp", "xnor", "bitat"]
    for t in table:
        assert 0.0 <= float(t["accuracy"]) <= 1.0
        assert float(t["train_seconds"]) > 0
    fp_acc = float(table[0]["accuracy"])
    assert float(table[0]["binary_param_share"]) == 0.0
    for t in table[1:]:
        np.testing.assert_allclose(float(t["gap_to_fp"]), float(t["accuracy"]) - fp_acc, atol=1e-6)
        assert 0.5 < float(t["binary_param_share"]) < 1.0  # stem, BN and classifier stay FP
    md = (work / "results.md").read_text()
    for m in ("fp", "xnor", "bitat"):
        assert f"| {m} |" in md
    for png in ("comparison.png", "stages.png"):
        assert (work / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The QAT runs started from the seed's FP model: their FP accuracy is the fp run's.
    import json

    for m in ("xnor", "bitat"):
        s = json.loads((work / "seed0" / m / "summary.json").read_text())
        assert s["fp_accuracy"] == pytest.approx(fp_acc)

    # Resume: nothing is run again, and the tables are rebuilt identically.
    def fail(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare, "_launch", fail)
    before = (work / "results.csv").read_text()
    compare.run_comparison(c, str(work), log=lambda *_: None)
    assert (work / "results.csv").read_text() == before

    # A finished run with a different config is refused, not mixed into the table.
    c.base.schedule.final_steps = 5
    with pytest.raises(ValueError, match="different config"):
        compare.run_comparison(c, str(work), log=lambda *_: None)
