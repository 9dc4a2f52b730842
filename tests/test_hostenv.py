"""Host tuning for XLA:CPU (qat_jax/hostenv.py): what the entry points and conftest apply."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from threadpoolctl import threadpool_info

from qat_jax import hostenv


def _blas_threads() -> dict:
    return {
        lib["filepath"]: lib["num_threads"]
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    }


def test_blas_limited_including_jaxlibs_lapack_provider():
    # conftest called tune_host(): every BLAS in the process runs one thread, including scipy's
    # OpenBLAS, which jaxlib's CPU LAPACK kernels (the Cayley solves) call.
    threads = _blas_threads()
    assert any("scipy_openblas" in path and "numpy" not in path for path in threads), threads
    assert set(threads.values()) == {1}, threads


def test_limit_blas_threads_sets_and_restores():
    try:
        n = hostenv.limit_blas_threads(2)
        assert n == len(_blas_threads()) >= 1
        assert set(_blas_threads().values()) == {2}
    finally:
        hostenv.limit_blas_threads(1)
    assert set(_blas_threads().values()) == {1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_host_reports_both():
    out = hostenv.tune_host()
    assert out["allocator"] == hostenv.allocator()
    assert out["malloc"] is True
    assert out["blas_libraries"] == len(_blas_threads())


# -- the allocator (tcmalloc by re-executing the entry point) ----------------------------------


def _env(**kw):
    return {"PATH": "/usr/bin", **kw}


def test_allocator_env_preloads_tcmalloc_once():
    env = hostenv.allocator_env(_env(), find=lambda: "libtcmalloc_minimal.so.4", platform="linux")
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert env["PATH"] == "/usr/bin"
    # The re-executed process (marked) never re-executes again, even if the loader refused.
    assert hostenv.allocator_env(env, find=lambda: "x.so", platform="linux") is None
    # A user's own preloads are kept, tcmalloc goes after them.
    env = hostenv.allocator_env(
        _env(LD_PRELOAD="libfoo.so"), find=lambda: "libtc.so", platform="linux"
    )
    assert env["LD_PRELOAD"] == "libfoo.so libtc.so"


@pytest.mark.parametrize(
    "environ, loaded, lib, platform",
    [
        (_env(QAT_JAX_ALLOCATOR="system"), "system", "libtc.so", "linux"),  # opted out
        (_env(), "tcmalloc", "libtc.so", "linux"),  # already on tcmalloc
        (_env(), "jemalloc", "libtc.so", "linux"),  # a user's jemalloc is kept
        (_env(), "system", None, "linux"),  # not installed
        (_env(), "system", "libtc.so", "darwin"),  # LD_PRELOAD is Linux's
    ],
)
def test_allocator_env_leaves_the_process_alone(environ, loaded, lib, platform):
    assert hostenv.allocator_env(environ, loaded, find=lambda: lib, platform=platform) is None


def test_allocator_env_rejects_an_unknown_choice_in_one_line():
    with pytest.raises(ValueError, match=r"QAT_JAX_ALLOCATOR='tcmaloc' is not one of auto, system"):
        hostenv.allocator_env(_env(QAT_JAX_ALLOCATOR="tcmaloc"), find=lambda: "libtc.so")


def test_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 fe:00 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert hostenv.allocator(str(maps)) == "system"
    maps.write_text("7f00-7f01 r-xp 0 fe:00 1 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert hostenv.allocator(str(maps)) == "tcmalloc"
    assert hostenv.allocator(str(tmp_path / "absent")) == "system"


_PROBE = (
    "import sys; from qat_jax import hostenv; hostenv.start_entry_point(); "
    "print(hostenv.allocator(), sys.argv[1:])"
)


def _probe(**env_over):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", hostenv._REEXEC_ENV)}
    env.pop(hostenv.ALLOCATOR_ENV, None)
    env.update(env_over)
    return subprocess.run(
        [sys.executable, "-c", _PROBE, "--flag=1"], env=env, capture_output=True, text=True
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_entry_point_reexecutes_with_tcmalloc_when_installed():
    out = _probe()
    assert out.returncode == 0, out.stderr
    expected = "tcmalloc" if hostenv.find_tcmalloc() else "system"
    # Same command line after the re-execution; the allocator switched iff tcmalloc is installed.
    assert out.stdout.split("\n")[0] == f"{expected} ['--flag=1']"
    assert _probe(QAT_JAX_ALLOCATOR="system").stdout.startswith("system ['--flag=1']")


def test_entry_point_bad_allocator_choice_exits_2_with_one_line():
    out = _probe(QAT_JAX_ALLOCATOR="fast")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: QAT_JAX_ALLOCATOR='fast' is not one of auto, system"
    ]
    assert out.stdout == ""
