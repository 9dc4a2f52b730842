"""The examples run and do what they document.

``examples/custom_model.py`` (bring your own model): a user-defined CNN built from
``qat_jax.BinaryConv`` goes FP -> one BiTAT stage per binary layer -> final -> packed export,
through public names only; here with tiny flags, on the suite's simulated devices (pmap over 8).
"""

import importlib.util
import os
import sys

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
def test_custom_model_example_binarizes_and_exports(tmp_path):
    example = _load_example("custom_model")
    out = tmp_path / "custom.qat"
    argv = ["--fp-steps=8", "--steps-per-stage=4", "--final-steps=2", "--seed=1", f"--out={out}"]
    result = example.main(argv)

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
