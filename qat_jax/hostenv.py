"""Host-process tuning for XLA:CPU (called by the entry points, never on import).

XLA:CPU allocates its large temporary buffers per step. With glibc's defaults those come from
``mmap`` in per-thread arenas and are returned to the kernel when freed, so every step page-faults
its whole working set back in: measured here on a 2-core CPU, the default model's train step spent
as much time in the kernel (0.20 s) as in user code (0.20 s), with ~117k minor page faults a step.
One malloc arena and no mmap/trim thresholds keep that memory in the process: 0.13 s a step, 7.8k
faults (``benchmarks/bench_step.py`` prints both). Accelerators are unaffected (their buffers live
on the device).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_malloc"]

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
