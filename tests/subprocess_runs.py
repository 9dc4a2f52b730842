"""Helpers for the tests that run ``python -m qat_jax.main`` as real subprocesses.

Shared by tests/test_resume.py, test_elastic.py, test_distributed.py and test_errors.py (not a
test module itself). Every child gets its own simulated device count through ``XLA_FLAGS`` and a
persistent XLA compilation cache shared by the whole pytest session: a child whose programs were
compiled by an earlier child (same device count) skips compilation, which cuts a tiny run from
about a minute to ~15 s on 2 cores. A cached executable is the same compiled program, so results
stay bit-identical.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"

# The tiny schedule of every subprocess test: 8 FP steps, 3 stages of 3 steps, 3 final steps
# (20 steps); a checkpoint every 4 steps plus one at each stage boundary (8, 11, 14, 17).
TINY_FLAGS = (
    "--config=configs/tiny.py",
    "--config.log_layer_metrics=False",
    "--config.checkpoint_every=4",
    "--config.keep_checkpoints=100",
)
TOTAL_STEPS = 20


def child_env(devices: int, cache_dir: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "QAT_JAX_"))}
    # LLVM's backend optimisation off: these tiny runs are all compile (measured on the 2-core
    # machine: a cold tiny run 77 s -> 59 s, same accuracy). Runs compared bit for bit (resume)
    # are all children built here, so they are compiled alike; launch/local.sh (the 2-process
    # test) sets its own XLA_FLAGS, compared within PARAM_REL only.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)  # turns on JAX's file lock
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def main_cmd(workdir, data_dir, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qat_jax.main",
        *TINY_FLAGS,
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={workdir}",
        *flags,
    ]


def run_main(workdir, data_dir, *flags, devices=8, cache_dir, timeout=600, **env):
    """Run the trainer CLI to its end (or its death); returns the CompletedProcess."""
    return subprocess.run(
        main_cmd(workdir, data_dir, *flags),
        cwd=ROOT,
        env=child_env(devices, cache_dir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(str(workdir), "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def tmp_entries(workdir) -> list[str]:
    d = os.path.join(str(workdir), "checkpoints")
    return [s for s in os.listdir(d) if "tmp" in s]


def restore(workdir, step) -> dict:
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))


def final_state(workdir) -> dict:
    return restore(workdir, checkpoint_steps(workdir)[-1])


def leaves_with_paths(tree) -> list[tuple[str, np.ndarray]]:
    import jax

    return [
        (jax.tree_util.keystr(p), np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def copy_workdir(src, dst, upto_step: int) -> None:
    """A copy of ``src`` as it was right after checkpoint ``upto_step`` (later ones dropped)."""
    shutil.copytree(str(src), str(dst))
    d = os.path.join(str(dst), "checkpoints")
    for s in os.listdir(d):
        if s.isdigit() and int(s) > upto_step:
            shutil.rmtree(os.path.join(d, s))
    for name in ("summary.json", "stages.png"):
        if os.path.exists(os.path.join(str(dst), name)):
            os.remove(os.path.join(str(dst), name))


# ---------------------------------------------------------------------------------------------
# Runs shared by several test modules, built once per pytest session (cached on disk under the
# session's base temp dir, so two modules importing these get the same run).


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock between the processes of one test run (pytest-xdist workers)."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def session_dirs(tmp_path_factory) -> tuple[str, str, str]:
    """(base dir, prepared data dir, XLA cache dir) of this test run.

    Shared by all pytest-xdist workers of the run (their base temp dirs are siblings), so a run
    that several test modules use is built once, by whichever worker needs it first. The XLA
    cache is the run's one persistent compilation cache (tests/conftest.py).
    """
    from qat_jax.data import prepare

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    base = str(root / "qat_jax_subprocess_runs")
    os.makedirs(base, exist_ok=True)
    data = os.path.join(base, "tfds")
    cache = os.environ["QAT_JAX_TEST_XLA_CACHE"]
    with _locked(data):
        if not os.path.isdir(os.path.join(data, "fashion_mnist")):
            prepare("fashion_mnist", FASHION, data, progress=False)
    return base, data, cache


def _once(path: str, build) -> str:
    with _locked(path):
        if not os.path.isdir(path):
            tmp = path + ".building"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            os.rename(tmp, path)
    return path


def built_once(tmp_path_factory, name: str, build) -> str:
    """``<run base>/<name>``, made by ``build(dir)`` once per test run whichever worker asks first
    (the other waits for it): for expensive in-process runs that several tests read."""
    base, _, _ = session_dirs(tmp_path_factory)
    return _once(os.path.join(base, name), build)


def reference_run(tmp_path_factory) -> str:
    """Workdir of the uninterrupted tiny run on 8 devices."""
    base, data, cache = session_dirs(tmp_path_factory)

    def build(w):
        p = run_main(w, data, devices=8, cache_dir=cache)
        assert p.returncode == 0, p.stderr[-3000:]

    return _once(os.path.join(base, "reference8"), build)


def killed_mid_stage(tmp_path_factory) -> str:
    """Workdir of an 8-device run SIGKILLed right after step 13 (mid stage 2 of 3)."""
    base, data, cache = session_dirs(tmp_path_factory)

    def build(w):
        p = run_main(w, data, devices=8, cache_dir=cache, QAT_JAX_FAULT="step:13")
        assert p.returncode == -9, p.stderr[-3000:]

    return _once(os.path.join(base, "killed_at_13"), build)


def continued_on(tmp_path_factory, devices: int) -> str:
    """:func:`killed_mid_stage`'s checkpoints (8 devices) continued to the end on ``devices``."""
    base, data, cache = session_dirs(tmp_path_factory)
    src = killed_mid_stage(tmp_path_factory)

    def build(w):
        copy_workdir(src, w, upto_step=12)
        p = run_main(w, data, devices=devices, cache_dir=cache)
        assert p.returncode == 0, p.stderr[-3000:]
        with open(os.path.join(w, "stdout.txt"), "w") as f:
            f.write(p.stdout)

    return _once(os.path.join(base, f"continued_on_{devices}"), build)
