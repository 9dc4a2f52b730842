"""Multi-process setup: resolution of flags/environment, the join watchdog, and real runs of two
processes on 127.0.0.1 (CPU, gloo) through launch/local.sh."""

import json
import os
import subprocess
import threading

import numpy as np
import pytest
import subprocess_runs as R
from numerics import PARAM_REL, assert_close_to_scale

from qat_jax.train import distributed as D

needs_data = pytest.mark.skipif(
    not os.path.isdir(R.FASHION), reason="needs Debian's dataset-fashion-mnist (CI installs it)"
)

SLURM = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def test_single_process_by_default_and_when_off():
    assert D.resolve(environ={}) == D.Plan(False, "single")
    assert not D.resolve("off", "h:1", 2, 0, environ=SLURM).enabled
    # A one-task SLURM allocation is a single process too.
    assert not D.resolve(environ={**SLURM, "SLURM_NTASKS": "1"}).enabled


def test_explicit_setup_from_flags_wins_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "e:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    p = D.resolve("auto", "10.0.0.1:1234", 2, 1, timeout_s=7, environ={**env, **SLURM})
    assert (p.enabled, p.source, p.coordinator_address, p.num_processes, p.process_id) == (
        True,
        "flags",
        "10.0.0.1:1234",
        2,
        1,
    )
    assert p.timeout_s == 7
    p = D.resolve(environ=env)
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("env", "e:2", 4, 3)


@pytest.mark.parametrize(
    "args, match",
    [
        (("auto", "h:1", None, 0), "--num_processes"),
        (("auto", None, 2, None), "--coordinator_address --process_id"),
        (("auto", "h:1", 2, 2), "0 <= process_id < num_processes"),
        (("auto", "host", 2, 0), "needs a port"),
        (("sometimes", None, None, None), "auto, on, off"),
    ],
)
def test_inconsistent_setups_name_the_fix(args, match):
    with pytest.raises(D.DistributedError, match=match):
        D.resolve(*args, environ={})


def test_cluster_auto_detection():
    assert D.resolve(environ=SLURM).source == "slurm"
    assert D.resolve(environ={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).source == "tpu"
    assert not D.resolve(environ={"TPU_WORKER_HOSTNAMES": "w0"}).enabled  # a single-host TPU VM
    assert D.resolve(environ={"OMPI_COMM_WORLD_SIZE": "4"}).source == "ompi"
    assert D.resolve("on", environ={}).source == "jax-auto"


def test_initialize_passes_the_plan_to_jax():
    calls = []
    plan = D.resolve("auto", "127.0.0.1:5", 2, 1, timeout_s=30, environ={})
    assert D.initialize(plan, initialize_fn=lambda **kw: calls.append(kw))
    assert calls == [
        {
            "initialization_timeout": 30 + D._JAX_GRACE_S,  # the watchdog fires first
            "heartbeat_timeout_seconds": 100,
            "coordinator_address": "127.0.0.1:5",
            "num_processes": 2,
            "process_id": 1,
        }
    ]
    calls.clear()
    assert D.initialize(D.resolve(environ=SLURM), initialize_fn=lambda **kw: calls.append(kw))
    assert calls[0]["cluster_detection_method"] == "slurm"
    assert not D.initialize(D.resolve(environ={}), initialize_fn=lambda **kw: calls.append(kw))


def test_watchdog_exits_when_a_peer_never_joins(capsys):
    exited = threading.Event()
    codes = []

    def hang(**_):  # a jax.distributed.initialize whose peer never shows up
        exited.wait(30)

    def exit_fn(code):
        codes.append(code)
        exited.set()

    plan = D.resolve("auto", "127.0.0.1:5", 2, 0, timeout_s=1, environ={})
    D.initialize(plan, initialize_fn=hang, exit_fn=exit_fn)
    assert codes == [D.EXIT_CODE]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: distributed setup did not complete")
    assert "--process_id" in err[0]


def test_jax_errors_become_one_clear_error():
    def boom(**_):
        raise RuntimeError("UNAVAILABLE: connection refused")

    plan = D.resolve("auto", "127.0.0.1:5", 2, 1, timeout_s=30, environ={})
    with pytest.raises(D.DistributedError, match="connection refused.*--coordinator_address"):
        D.initialize(plan, initialize_fn=boom)


@pytest.mark.slow
@needs_data
def test_missing_peer_fails_fast_with_a_clear_message(tmp_path_factory, tmp_path):
    _, data, cache = R.session_dirs(tmp_path_factory)
    port = R.free_port()
    p = R.run_main(
        tmp_path,
        data,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        "--process_id=0",
        "--distributed_timeout=3",
        devices=2,
        cache_dir=cache,
        timeout=120,
    )
    assert p.returncode == D.EXIT_CODE, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: distributed setup did not complete within 3s")
    assert "not all 2 processes joined" in last
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess_runs")
@needs_data
def test_two_processes_match_one_process_with_four_devices(tmp_path_factory, tmp_path):
    """2 processes x 2 devices continue the 8-device checkpoint like 1 process x 4 devices.

    Not bit-identical: the cross-process mean (gloo) adds the 4 devices' values in another order
    than the in-process all-reduce; float32 rounding differences then grow through 8 Adam steps.
    """
    _, data, cache = R.session_dirs(tmp_path_factory)
    one = R.continued_on(tmp_path_factory, 4)
    w = str(tmp_path / "two")
    R.copy_workdir(R.killed_mid_stage(tmp_path_factory), w, upto_step=12)
    launcher = ["bash", os.path.join(R.ROOT, "launch", "local.sh"), "--processes", "2"]
    launcher += ["--devices", "2", "--port", str(R.free_port()), "--timeout", "120"]
    main = R.main_cmd(w, data)  # [python, -m, qat_jax.main, flags...]
    cmd = [*launcher, "--python", main[0], "--", *main[3:]]
    env = R.child_env(2, cache)
    del env["XLA_FLAGS"]  # local.sh sets it
    p = subprocess.run(cmd, cwd=R.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("resumed from step 12") == 1  # only process 0 logs
    assert R.checkpoint_steps(w)[-1] == R.TOTAL_STEPS
    summary = json.load(open(os.path.join(w, "summary.json")))
    assert summary["devices"] == 4

    def train_records(workdir):
        lines = open(os.path.join(workdir, "metrics.jsonl"))
        return [r for r in map(json.loads, lines) if r["kind"] == "train" and r["step"] > 12]

    mine, theirs = train_records(w), train_records(one)
    assert [r["step"] for r in mine] == [14, 16, 18, 20]  # one writer: no duplicated records
    assert [r["step"] for r in theirs] == [14, 16, 18, 20]
    for a, b in zip(mine, theirs, strict=True):  # the same logged metrics, step by step
        for key in ("loss", "ce", "kd", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, err_msg=f"step {a['step']} {key}")
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 16  # at most one image of the batch
        assert a["nonfinite"] == b["nonfinite"] == 0.0

    a, b = R.final_state(one), R.final_state(w)
    for part in ("params", "state"):
        la, lb = R.leaves_with_paths(a[part]), R.leaves_with_paths(b[part])
        scale = max(float(np.abs(x).max()) for _, x in la if x.dtype.kind == "f")
        for (k, x), (_, y) in zip(la, lb, strict=True):
            if x.dtype.kind == "f":
                assert_close_to_scale(y, x, PARAM_REL, scale=scale, err_msg=f"{part}{k}")
            else:
                np.testing.assert_array_equal(y, x, err_msg=f"{part}{k}")
    ref = json.load(open(os.path.join(one, "summary.json")))
    assert abs(ref["w1a1_accuracy"] - summary["w1a1_accuracy"]) <= 0.01
