"""The FP model of a run: its variables, starting from one, and loading one from a file."""

import numpy as np
import pytest

from qat_jax.experiment import ConfigError
from qat_jax.train import checkpoint, fp_init
from qat_jax.train.state import TrainState


def _variables(seed, kernel_shape=(3, 3, 1, 4), rprelu=False):
    """A model's variables in miniature: one binary layer, one BN, their quantizer variables."""
    r = np.random.default_rng(seed)
    conv = {"kernel": r.normal(size=kernel_shape).astype(np.float32)}
    if rprelu:
        conv["rprelu"] = {"gamma": np.ones((4,), np.float32)}
    return {
        "params": {"conv": conv, "bn": {"scale": r.normal(size=(4,)).astype(np.float32)}},
        "quant": {"conv": {"tau": r.normal(size=(1,)).astype(np.float32)}},
        "batch_stats": {"bn": {"mean": r.normal(size=(4,)).astype(np.float32)}},
        "qstate": {"conv": {"w_mode": np.int32(2), "a_mode": np.int32(1)}},
    }


def _state(v):
    return TrainState(
        step=np.int32(0),
        params={"params": v["params"], "quant": v["quant"]},
        state={"batch_stats": v["batch_stats"], "qstate": v["qstate"]},
        opt_state=(),
        mask={},
    )


def test_fp_variables_zero_every_mode_and_keep_the_rest():
    v = _variables(0)
    fp = fp_init.fp_variables(_state(v))
    assert int(fp["qstate"]["conv"]["w_mode"]) == 0 and int(fp["qstate"]["conv"]["a_mode"]) == 0
    np.testing.assert_array_equal(fp["params"]["conv"]["kernel"], v["params"]["conv"]["kernel"])
    np.testing.assert_array_equal(fp["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])
    assert int(v["qstate"]["conv"]["w_mode"]) == 2  # the state itself is unchanged


def test_loading_fills_params_and_batch_stats_only(tmp_path):
    """An earlier run's teacher onto this run's variables: its FP model (``params``,
    ``batch_stats``) is read, its quantizer variables are not; RPReLU new in this model keeps
    its initial value; with_fp_model puts exactly those two collections into the state."""
    saved, ours = _variables(1), _variables(2, rprelu=True)
    checkpoint.save_variables(str(tmp_path / "teacher"), saved)
    like = fp_init.fp_variables(_state(ours))
    out = fp_init.load_fp_init(str(tmp_path / "teacher"), like)
    np.testing.assert_array_equal(
        out["params"]["conv"]["kernel"], saved["params"]["conv"]["kernel"]
    )
    np.testing.assert_array_equal(out["params"]["bn"]["scale"], saved["params"]["bn"]["scale"])
    np.testing.assert_array_equal(
        out["batch_stats"]["bn"]["mean"], saved["batch_stats"]["bn"]["mean"]
    )
    np.testing.assert_array_equal(out["quant"]["conv"]["tau"], ours["quant"]["conv"]["tau"])
    np.testing.assert_array_equal(out["params"]["conv"]["rprelu"]["gamma"], np.ones(4))
    assert out["params"]["conv"]["kernel"].dtype == np.float32

    started = fp_init.with_fp_model(_state(ours), out)
    assert started.params["params"] is out["params"]
    assert started.state["batch_stats"] is out["batch_stats"]
    np.testing.assert_array_equal(
        started.params["quant"]["conv"]["tau"], ours["quant"]["conv"]["tau"]
    )
    assert int(started.state["qstate"]["conv"]["w_mode"]) == 2


def test_a_misshapen_or_missing_variable_is_a_one_line_config_error(tmp_path):
    checkpoint.save_variables(str(tmp_path / "wide"), _variables(1, kernel_shape=(3, 3, 1, 8)))
    like = fp_init.fp_variables(_state(_variables(2)))
    with pytest.raises(ConfigError) as e:
        fp_init.load_fp_init(str(tmp_path / "wide"), like)
    msg = str(e.value)
    assert "\n" not in msg
    assert "params/conv/kernel has shape (3, 3, 1, 8), expected (3, 3, 1, 4)" in msg
    assert "check config.model" in msg

    partial = _variables(1)
    del partial["params"]["bn"]
    checkpoint.save_variables(str(tmp_path / "partial"), partial)
    with pytest.raises(ConfigError, match="1 problems: missing params/bn\\)"):
        fp_init.load_fp_init(str(tmp_path / "partial"), like)
