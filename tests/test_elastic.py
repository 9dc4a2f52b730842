"""Elastic restore: a checkpoint written with 8 devices continues on 1 and on 4 devices.

The checkpoint holds the host (unreplicated) state, the data iterator's position counts global
batches, and the global batch stays 16: only the per-device batch changes (2 -> 16 or 4). The
result matches the uninterrupted 8-device run up to float32 rounding, not bit for bit: the
gradient/BN-statistics means over devices (``lax.pmean``) and the per-device batch means add the
same numbers in a different order, and those last-bit differences grow a little through the
remaining 8 Adam steps.
"""

import json
import os

import numpy as np
import pytest
import subprocess_runs as R
from numerics import PARAM_REL, assert_close_to_scale

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("subprocess_runs"),
    pytest.mark.skipif(
        not os.path.isdir(R.FASHION), reason="needs Debian's dataset-fashion-mnist (CI installs it)"
    ),
]


@pytest.mark.parametrize("devices", [1, 4])
def test_eight_device_checkpoint_continues_on_fewer_devices(tmp_path_factory, devices):
    ref = R.reference_run(tmp_path_factory)
    w = R.continued_on(tmp_path_factory, devices)
    with open(os.path.join(w, "stdout.txt")) as f:
        assert "resumed from step 12" in f.read()
    assert json.load(open(os.path.join(w, "summary.json")))["devices"] == devices
    a, b = R.final_state(ref), R.final_state(w)
    for part in ("params", "state"):
        la, lb = R.leaves_with_paths(a[part]), R.leaves_with_paths(b[part])
        assert [k for k, _ in la] == [k for k, _ in lb]
        scale = max(float(np.abs(x).max()) for _, x in la if x.dtype.kind == "f")
        for (k, x), (_, y) in zip(la, lb, strict=True):
            if x.dtype.kind == "f":
                assert_close_to_scale(y, x, PARAM_REL, scale=scale, err_msg=f"{part}{k}")
            else:  # modes, block ids, binary patterns
                np.testing.assert_array_equal(y, x, err_msg=f"{part}{k}")
    sa = json.load(open(os.path.join(ref, "summary.json")))
    sb = json.load(open(os.path.join(w, "summary.json")))
    assert abs(sa["w1a1_accuracy"] - sb["w1a1_accuracy"]) <= 0.02  # <= 4 of 200 test images
