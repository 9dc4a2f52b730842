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

glibc's malloc stays slow for XLA:CPU even tuned: once a process has compiled a program (LLVM's
many small allocations fragment the one arena), each step spends its time searching the free
lists (``_int_malloc``, 17 % of the step's cycles in ``perf``) and zeroing re-faulted pages
(``clear_page``, 15-36 %). tcmalloc does neither: measured on a 2-core CPU the default model's FP
step ran 1.5x faster and compiled 1.5x faster, and the whole default job 2.1x faster with the same
accuracies (docs/performance.md, "The memory allocator"; PyTorch's eager step gains 1.1-1.3x). A process
picks its allocator at start-up, so :func:`use_fast_allocator` re-executes the entry point once
with tcmalloc in ``LD_PRELOAD`` when the library is installed (Debian: ``libtcmalloc-minimal4``)
and ``QAT_JAX_ALLOCATOR`` is not ``system``. Results are unchanged: the allocator places buffers,
it computes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "ALLOCATOR_ENV",
    "allocator",
    "allocator_env",
    "limit_blas_threads",
    "start_entry_point",
    "tune_host",
    "tune_malloc",
    "use_fast_allocator",
]

ALLOCATOR_ENV = "QAT_JAX_ALLOCATOR"  # auto (tcmalloc when installed) | system
ALLOCATOR_CHOICES = ("auto", "system")
_REEXEC_ENV = "QAT_JAX_ALLOCATOR_REEXEC"  # set on the re-executed process: never loop
_FAST = ("tcmalloc", "jemalloc")  # either counts as a fast allocator already loaded

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MAX = 2**31 - 1


def allocator(maps_path: str = "/proc/self/maps") -> str:
    """The malloc this process runs on: ``tcmalloc``, ``jemalloc`` or ``system``."""
    try:
        with open(maps_path) as f:
            maps = f.read()
    except OSError:
        return "system"
    return next((name for name in _FAST if f"lib{name}" in maps), "system")


def find_tcmalloc() -> str | None:
    """The installed tcmalloc's library name (``libtcmalloc_minimal.so.4``), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator_env(
    environ: Mapping[str, str],
    loaded: str = "system",
    find: Callable[[], str | None] = find_tcmalloc,
    platform: str = sys.platform,
) -> dict[str, str] | None:
    """The environment to re-execute with for tcmalloc, or None when there is nothing to do.

    Nothing to do: not Linux, ``QAT_JAX_ALLOCATOR=system``, a fast allocator already ``loaded``,
    this process already re-executed once (the loader may have refused the library), or no
    tcmalloc installed. Otherwise ``environ`` with the library appended to ``LD_PRELOAD``.
    Raises ValueError (one line) for an unknown ``QAT_JAX_ALLOCATOR``.
    """
    choice = environ.get(ALLOCATOR_ENV, "auto") or "auto"
    if choice not in ALLOCATOR_CHOICES:
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r} is not one of {', '.join(ALLOCATOR_CHOICES)}")
    if choice == "system" or not platform.startswith("linux"):
        return None
    if loaded in _FAST or environ.get(_REEXEC_ENV):
        return None
    lib = find()
    if lib is None:
        return None
    preload = " ".join(p for p in (environ.get("LD_PRELOAD", ""), lib) if p)
    return {**environ, "LD_PRELOAD": preload, _REEXEC_ENV: "1"}


def use_fast_allocator(argv: Sequence[str] | None = None) -> None:
    """Re-execute this process with tcmalloc preloaded (see the module doc); else return.

    Call it first thing in an entry point, before the work starts: the process is replaced, and
    runs again from the top with the same command line (``sys.orig_argv``).
    """
    env = allocator_env(os.environ, loaded=allocator())
    if env is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def start_entry_point() -> None:
    """:func:`use_fast_allocator` for a ``__main__`` guard: a bad ``QAT_JAX_ALLOCATOR`` exits 2
    with a one-line error. Never call it where the process must not be replaced (tests, a
    notebook): it runs the command line again."""
    try:
        use_fast_allocator()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
    """The tunings of this module; the entry points call it first thing (after
    :func:`use_fast_allocator`). glibc's malloc is tuned only when it is the allocator.

    ``tune_malloc`` must run before the JAX backend starts its threads, so this touches no JAX
    backend (``jax.distributed.initialize`` may still follow). The BLAS limit is applied on every
    backend: on GPU/TPU the step's linear algebra runs on the device, and the host's own (PCA of a
    calibrated layer in numpy) is small.
    """
    name = allocator()
    return {
        "allocator": name,
        "malloc": name != "system" or tune_malloc(),
        "blas_libraries": limit_blas_threads(1),
    }
