"""Exact resume after real SIGKILLs: mid-stage, inside a checkpoint write, at a stage boundary.

One 8-device workdir is killed three times (through the ``QAT_JAX_FAULT`` hook of
qat_jax/train/checkpoint.py), its latest checkpoint is then corrupted, and the same command is
rerun each time; the run must end bit-identical (params, state) to an uninterrupted run and never
lose more than one checkpoint interval (``checkpoint_every=4``) to a kill.
"""

import json
import os
import shutil

import numpy as np
import pytest
import subprocess_runs as R

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("subprocess_runs"),
    pytest.mark.skipif(
        not os.path.isdir(R.FASHION), reason="needs Debian's dataset-fashion-mnist (CI installs it)"
    ),
]

INTERVAL = 4  # --config.checkpoint_every of R.TINY_FLAGS


def _corrupt(step_dir):
    """Overwrite every data file of a checkpoint's state (its metadata stays, so it is listed)."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            if not f.startswith("_") and "manifest" not in f:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")


def test_killed_three_times_then_resumed_is_bit_identical(tmp_path_factory, tmp_path):
    _, data, cache = R.session_dirs(tmp_path_factory)
    ref = R.reference_run(tmp_path_factory)
    w = str(tmp_path / "run")

    # 1. SIGKILL right after step 13, in the middle of stage 2.
    shutil.copytree(R.killed_mid_stage(tmp_path_factory), w)
    assert R.checkpoint_steps(w) == [4, 8, 11, 12]  # 8 and 11 are stage boundaries
    assert 13 - R.checkpoint_steps(w)[-1] <= INTERVAL

    # 2. SIGKILL inside the write of the stage-boundary checkpoint 14: its files are complete in
    # orbax's temporary directory, the rename that publishes it has not happened.
    p = R.run_main(w, data, cache_dir=cache, QAT_JAX_FAULT="save:14")
    assert p.returncode == -9, p.stderr[-2000:]
    assert "resumed from step 12" in p.stdout
    assert R.checkpoint_steps(w) == [4, 8, 11, 12]  # the half-written 14 is not visible ...
    assert any(e.startswith("14.") for e in R.tmp_entries(w))  # ... it is a tmp dir
    assert 14 - R.checkpoint_steps(w)[-1] <= INTERVAL

    # 3. SIGKILL after step 17, the last step of stage 3 (before the final phase's boundary).
    p = R.run_main(w, data, cache_dir=cache, QAT_JAX_FAULT="step:17")
    assert p.returncode == -9, p.stderr[-2000:]
    assert "resumed from step 12" in p.stdout
    assert R.tmp_entries(w) == []  # the killed write's tmp dir was cleaned up at the restart
    assert R.checkpoint_steps(w) == [4, 8, 11, 12, 14, 16]
    assert 17 - R.checkpoint_steps(w)[-1] <= INTERVAL

    # 4. The latest checkpoint is unreadable: the rerun warns and falls back to 14.
    _corrupt(os.path.join(w, "checkpoints", "16"))
    p = R.run_main(w, data, cache_dir=cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "checkpoint 16" in p.stderr and "unreadable" in p.stderr
    assert "resumed from step 14" in p.stdout
    assert R.checkpoint_steps(w)[-1] == R.TOTAL_STEPS

    a, b = R.final_state(ref), R.final_state(w)
    for part in ("params", "state", "opt_state"):
        la, lb = R.leaves_with_paths(a[part]), R.leaves_with_paths(b[part])
        assert [k for k, _ in la] == [k for k, _ in lb]
        for (k, x), (_, y) in zip(la, lb, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"{part}{k}")
    sa = json.load(open(os.path.join(ref, "summary.json")))
    sb = json.load(open(os.path.join(w, "summary.json")))
    assert sa["w1a1_accuracy"] == sb["w1a1_accuracy"]
    assert sa["stage_accuracy"] == sb["stage_accuracy"]
