"""The default recipe end to end: configs/default.py's switches on the tiny model, trained, exported.

configs/default.py turns on four switches that configs/tiny.py (derived from configs/faithful.py)
leaves off: the real-valued shortcuts, FP depthwise convs, the activations-first step and the
per-stage learning rate. Each switch has its own unit tests; this test runs them together through
the trainer and the packed export, reading the switches' values from configs/default.py so it
follows the default when it changes.
"""

import os

import numpy as np
import pytest
from numerics import assert_logits_match

from qat_jax import export
from qat_jax.models import quantizable_layers
from qat_jax.train import train_and_evaluate
from qat_jax.train.config_files import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIT_RTOL = 1e-5  # packed vs eval logits: float32 reassociation (as in test_export)
RECIPE = (
    ("model", "binary_shortcut"),
    ("quant", "fp_kinds"),
    ("schedule", "acts_first_steps"),
    ("optim", "schedule"),
    ("optim", "warmup_steps"),
)


def _recipe_config(data_dir):
    default = load_config_file(os.path.join(ROOT, "configs", "default.py"))
    c = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    c.unlock()
    for group, key in RECIPE:
        c[group][key] = default[group][key]
    c.schedule.acts_first_steps = 3  # the tiny budget: one stage's worth, like the default's
    c.optim.warmup_steps = 1
    c.dataset.data_dir = str(data_dir)
    # 'progressive' (C = I) compiles ~2x faster than 'bitat' (CI budget); the switches act the
    # same way under both, and the transform has its own tests.
    c.method = "progressive"
    return c


@pytest.mark.slow
def test_default_recipe_trains_and_exports_with_fp_depthwise_and_shortcuts(
    fashion_mnist_dir, tmp_path
):
    c = _recipe_config(fashion_mnist_dir)
    assert c.model.binary_shortcut and "depthwise" in c.quant.fp_kinds
    workdir = os.path.join(tmp_path, "run")
    summary = train_and_evaluate(c, workdir)
    labels = [s["label"] for s in summary["stage_accuracy"]]
    # tiny: two blocks + head_conv = 3 block stages, after the activations-first stage.
    assert len(labels) == 1 + 3 + 1 and labels[-1] == "final", labels
    assert "depthwise" not in " ".join(labels[1:])  # kept FP: in no weight stage

    path = os.path.join(tmp_path, "m.qat")
    export.export_run(workdir, path)
    packed = export.load_packed(path)
    ops = packed.header["ops"]
    run = export.load_run_variables(workdir)
    layers = ["/".join(q.path) for q in quantizable_layers(run.variables)]
    kind = {op["name"]: op["op"] for op in ops if op["op"] in ("conv", "binary_conv")}
    for name in layers:
        want = "conv" if name.endswith("depthwise") else "binary_conv"
        assert kind[name] == want, (name, kind[name])
    assert sum(op["op"] == "shortcut_add" for op in ops) == len(layers)

    got, want, labels = export.packed_and_eval_logits(run, packed, batch_size=100)
    assert_logits_match(got, want, LOGIT_RTOL)
    assert np.mean(got.argmax(-1) == labels) == pytest.approx(summary["w1a1_accuracy"], abs=1e-9)
