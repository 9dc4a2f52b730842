"""The examples run and do what they document.

``examples/custom_model.py`` (bring your own model): a user-defined CNN built from
``qat_jax.BinaryConv`` goes FP -> one BiTAT stage per binary layer -> final -> packed export,
through public names only, validating its settings first and checkpointing every stage boundary
so that a rerun resumes; here with tiny flags, on the suite's simulated devices (pmap over 8).
"""

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
from numerics import assert_logits_match

import qat_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Packed vs eval logits (as in test_export.py): the binary dot products are exact integers in both
# paths, only float32 rounding of the folded BN and the FP stem/classifier differs (~1e-7
# relative); one flipped activation or weight bit would move a logit by far more.
LOGIT_RTOL = 1e-5


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (the linen modules) look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_custom_model_example_binarizes_exports_and_resumes(tmp_path, capsys):
    example = _load_example("custom_model")
    out, work = tmp_path / "custom.qat", tmp_path / "work"
    argv = ["--fp-steps=8", "--steps-per-stage=4", "--final-steps=2", "--seed=1"]
    argv += [f"--out={out}", f"--workdir={work}"]
    result = example.main(argv)
    assert result["resumed_from"] is None

    # The model's own BinaryConvs are the binary layers, one block (stage) each, bottom to top.
    paths = [q.path for q in result["layers"]]
    assert paths == [("binary0",), ("binary1",)]
    assert [q.block_id for q in result["layers"]] == [0, 1]
    # Every one ends frozen binary with a binary input (a W1A1 conv).
    for path in paths:
        qs = result["qstate"][path[0]]
        assert (qs["w_mode"], qs["a_mode"]) == (qat_jax.FROZEN, qat_jax.BINARY_INPUT), (path, qs)
    # The export: one packed binary_conv per binary layer, the stem and classifier FP.
    ops = result["ops"]
    assert [op["name"] for op in ops if op["op"] == "binary_conv"] == ["binary0", "binary1"]
    assert [op["name"] for op in ops if op["op"] in ("conv", "dense")] == ["stem", "classifier"]
    assert out.is_file()
    # The packed XNOR-popcount forward gives the model's eval logits.
    assert_logits_match(
        result["packed_logits"], result["eval_logits"], LOGIT_RTOL, err_msg="packed vs eval"
    )

    # Checkpoints at the stage boundaries (FP -> stage 1 at step 8, stage 2 at 12, final at 16)
    # and at the end (18), the three newest kept; the FP teacher beside them.
    ckpts = work / "checkpoints"
    assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [12, 16, 18]
    assert (work / "teacher").is_dir()
    # A rerun after the last checkpoint was lost resumes at the final phase's start and ends
    # exactly where the first run ended (same data order, restored optimizer state and teacher).
    shutil.rmtree(ckpts / "18")
    capsys.readouterr()
    again = example.main(argv)
    assert again["resumed_from"] == 16
    assert "resumed from step 16 (final)" in capsys.readouterr().out
    np.testing.assert_array_equal(again["eval_logits"], result["eval_logits"])
    np.testing.assert_array_equal(again["packed_logits"], result["packed_logits"])


def test_custom_model_example_validates_before_compute(tmp_path, capsys):
    example = _load_example("custom_model")
    # 8 simulated devices: a batch of 12 cannot be split; one line naming the key, exit code 2.
    with pytest.raises(SystemExit) as exc:
        example.main(["--batch-size=12", f"--workdir={tmp_path / 'w'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "batch_size=12 must be a positive multiple of the 8 devices" in err, err
    assert not (tmp_path / "w").exists()
