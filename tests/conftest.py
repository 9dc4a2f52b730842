"""Shared test setup.

Eight simulated CPU devices for the ``pmap`` tests: ``XLA_FLAGS`` must be set before jax is
imported (and before its backend initialises), so it is done here, at the top of the conftest that
pytest loads before any test module.
"""

import json
import os
import shutil
import tempfile
import time

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# One persistent XLA compilation cache for the whole test run: every test process (the pytest-xdist
# workers) and every subprocess the tests start (``qat_jax.main`` children inherit the variable)
# load a program another one already compiled instead of compiling it again. A fresh directory per
# run (made by the first process, inherited by the workers it starts, removed at the end), so
# nothing stale from an earlier checkout is ever loaded; a cached executable is the same compiled
# program, so results are bit-identical. The size limit turns on JAX's file lock, which makes
# concurrent writers and readers of the directory safe.
_CACHE_ENV = "QAT_JAX_TEST_XLA_CACHE"
_OWNS_CACHE = _CACHE_ENV not in os.environ
if _OWNS_CACHE:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="qat_jax_tests_xla_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_compilation_cache_max_size", 8 << 30)

from qat_jax.hostenv import tune_host  # noqa: E402

tune_host()  # XLA:CPU steps page-fault far less (qat_jax/hostenv.py); before the backend starts

N_DEVICES = 8


def pytest_configure(config):
    """The xdist workers this process starts run on tcmalloc when it is installed, as the entry
    points do (qat_jax/hostenv.py: glibc's malloc makes XLA:CPU's compiles and steps ~2x slower
    once a process has compiled). LD_PRELOAD acts when a process starts, so this process (which
    only schedules the workers) keeps its allocator; ``QAT_JAX_ALLOCATOR=system`` keeps glibc's
    everywhere. Runs before xdist starts the workers (at session start)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    from qat_jax import hostenv

    try:
        env = hostenv.allocator_env(os.environ, loaded=hostenv.allocator())
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if env is not None:
        os.environ["LD_PRELOAD"] = env["LD_PRELOAD"]


def pytest_collection_modifyitems(config, items):
    """Slow tests first, the long chains of one xdist group (a run shared by several tests)
    before them: with ``--dist loadgroup`` the two workers then take the long work first and
    the many short tests fill the end, instead of one worker finishing a long test alone."""

    def rank(item):
        if item.get_closest_marker("xdist_group"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: file order within each rank


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """A TFDS data dir with Fashion-MNIST prepared from Debian's files, once per test run (shared
    by the xdist workers; read-only for the tests that use it)."""
    import subprocess_runs

    if not os.path.isdir(subprocess_runs.FASHION):
        pytest.skip("needs Debian's dataset-fashion-mnist (CI installs it)")
    return subprocess_runs.session_dirs(tmp_path_factory)[1]


@pytest.fixture
def rng():
    """A fixed numpy generator (reference computations, random shapes' contents)."""
    return np.random.default_rng(0)


@pytest.fixture
def key():
    """A fixed jax PRNG key."""
    return jax.random.PRNGKey(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    XLA:CPU maps ~3 memory regions per compiled program (measured: 300 small jits took a process
    from 446 to 1,410 maps; ``jax.clear_caches()`` brought it back to 528). The whole suite in one
    process compiles enough programs to reach the kernel's default ``vm.max_map_count`` (65,530),
    where LLVM fails with "Unable to allocate section memory" or segfaults mid-suite.
    """
    yield
    jax.clear_caches()


# ---------------------------------------------------------------------------------------------
# XLA compile time per test module, printed at the end of the run (the CI log shows where the
# suite's time goes), summed over the xdist workers. Subprocess tests report their own
# wall time through --durations.

_COMPILE_SECONDS: dict[str, float] = {}
_CURRENT_MODULE = ["<collection>"]


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        m = _CURRENT_MODULE[0]
        _COMPILE_SECONDS[m] = _COMPILE_SECONDS.get(m, 0.0) + seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT_MODULE[0] = item.nodeid.split("::")[0]


def pytest_sessionfinish(session):
    # A pytest-xdist worker hands its compile times to the controlling process.
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["qat_jax_compile_seconds"] = json.dumps(_COMPILE_SECONDS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    worker = json.loads(getattr(node, "workeroutput", {}).get("qat_jax_compile_seconds", "{}"))
    for m, s in worker.items():
        _COMPILE_SECONDS[m] = _COMPILE_SECONDS.get(m, 0.0) + s


def pytest_unconfigure(config):
    if _OWNS_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("QAT_JAX_CI_START", "").isdigit():  # set by .ci/run
        elapsed = time.time() - int(os.environ["QAT_JAX_CI_START"])
        terminalreporter.write_sep("=", f".ci/run so far: {elapsed:.0f} s (install, lint, tests)")
    if not _COMPILE_SECONDS:
        return
    total = sum(_COMPILE_SECONDS.values())
    terminalreporter.write_sep("=", f"XLA compile time in the test processes: {total:.0f} s")
    for m, s in sorted(_COMPILE_SECONDS.items(), key=lambda kv: -kv[1])[:12]:
        terminalreporter.write_line(f"{s:8.1f} s  {m}")
