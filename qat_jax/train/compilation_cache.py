"""JAX's persistent compilation cache for the entry points (``--compilation_cache_dir``).

A run compiles the same few programs every time (the FP and QAT train steps, evaluation,
calibration, BN re-estimation): on the default model they took 90-100 s of XLA time on a 2-core
CPU, over 6 minutes for MobileNetV2 at width 1.0. With the cache, every later run of the
same model, batch shape and device count (another seed, another method of a comparison, a
restarted job) loads them from disk instead (``benchmarks/bench_run.py --compilation_cache_dir``
measures both; ``docs/performance.md``).

The entry points (``qat_jax.main``, ``qat_jax.compare``) enable it by default in the user's cache
directory; library code never touches JAX's global config on its own.
"""

from __future__ import annotations

import os

import jax

__all__ = ["default_dir", "enable"]


def default_dir() -> str:
    """``$JAX_COMPILATION_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/qat_jax/xla``
    (``~/.cache/qat_jax/xla`` when that is unset too)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qat_jax", "xla")


def enable(path: str | None, min_compile_seconds: float | None = None) -> str | None:
    """Cache every program that took at least ``min_compile_seconds`` to compile under ``path``.

    ``path`` ``None``, ``''`` or ``'none'`` turns the cache off (even when
    ``JAX_COMPILATION_CACHE_DIR`` is set). Call it before the first compile. Child processes
    inherit the choice (``JAX_COMPILATION_CACHE_DIR``, ``JAX_ENABLE_COMPILATION_CACHE``).
    ``min_compile_seconds`` ``None`` keeps JAX's setting (1 s unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise).

    Returns the absolute directory used, or ``None``. Raises ``ValueError`` when ``path`` cannot be
    created or written (before any compute, so nothing is lost).
    """
    if path is None or path.strip().lower() in ("", "none"):
        # Off means off, also when JAX_COMPILATION_CACHE_DIR is set (and for child processes).
        jax.config.update("jax_enable_compilation_cache", False)
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation cache directory {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"compilation cache directory {path} is not writable")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "true"  # child processes (qat_jax.compare's runs)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    if min_compile_seconds is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path
