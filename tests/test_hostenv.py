"""Host tuning for XLA:CPU (qat_jax/hostenv.py): what the entry points and conftest apply."""

from __future__ import annotations

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
    assert out["malloc"] is True
    assert out["blas_libraries"] == len(_blas_threads())
