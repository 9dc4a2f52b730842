"""Host-process tuning for XLA:CPU (called by the entry points, never on import).

XLA:CPU allocates its large temporary buffers per step. With glibc's defaults those come from
``mmap`` in per-thread arenas and are returned to the kernel when freed, so every step page-faults
its whole working set back in: measured here on a 2-core CPU, the default model's train step spent
as much time in the kernel (0.20 s) as in user code (0.20 s), with ~117k minor page faults a step.
One malloc arena and no mmap/trim thresholds keep that memory in the process: 0.13 s a step, 7.8k
faults (``benchmarks/bench_step.py`` prints both). Accelerators are unaffected (their buffers live
on the device).

XLA:CPU runs LAPACK custom calls (the Cayley transform's LU solves, ``eigh``) through scipy's
OpenBLAS, which starts its own thread per core. Those threads spin against XLA's intra-op pool:
measured on the same 2-core CPU, one 48x48 triangular solve inside the default model's train step
took 7.6 ms and the ops running beside it slowed down too, so the stages with a trainable transform
cost 1.29-1.44x the ``xnor`` step; with OpenBLAS at one thread, 1.00-1.07x
(``benchmarks/bench_step.py --setup=default``; ``docs/performance.md``). :func:`limit_blas_threads` sets that, :func:`tune_host` does both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_host", "tune_malloc", "limit_blas_threads"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MAX = 2**31 - 1


def tune_malloc() -> bool:
    """Keep freed memory in-process on glibc (Linux). Returns whether it was applied.

    Call it early, before the JAX backend starts its threads.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(
        mallopt(_M_ARENA_MAX, 1)
        and mallopt(_M_MMAP_THRESHOLD, _MAX)
        and mallopt(_M_TRIM_THRESHOLD, _MAX)
    )


def limit_blas_threads(threads: int = 1) -> int:
    """Limit the BLAS/LAPACK libraries XLA:CPU and numpy call to ``threads`` threads each.

    Loads scipy's LAPACK first (jaxlib's CPU LAPACK kernels call it, and it is otherwise loaded
    lazily at the first linear solve), then sets every loaded BLAS's thread count with
    ``threadpoolctl``. Returns how many BLAS libraries are loaded (all of them limited).
    """
    try:
        import scipy.linalg.cython_lapack  # noqa: F401  (jaxlib's LAPACK provider)
    except ImportError:
        pass
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(limits=int(threads), user_api="blas")
    return sum(1 for lib in threadpool_info() if lib.get("user_api") == "blas")


def tune_host() -> dict:
    """Both tunings of this module; the entry points call it first thing.

    ``tune_malloc`` must run before the JAX backend starts its threads, so this touches no JAX
    backend (``jax.distributed.initialize`` may still follow). The BLAS limit is applied on every
    backend: on GPU/TPU the step's linear algebra runs on the device, and the host's own (PCA of a
    calibrated layer in numpy) is small.
    """
    return {"malloc": tune_malloc(), "blas_libraries": limit_blas_threads(1)}
