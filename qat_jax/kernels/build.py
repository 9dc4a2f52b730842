"""Build and load the compiled CPU kernels, once per machine, on first use.

The kernels are C++ sources of this package (``*.cc`` beside this file) written against the XLA FFI
headers that jaxlib ships (``jax.ffi.include_dir()``). They are compiled the first time a process
asks for them, with the host's C++ compiler (``$CXX``, else ``c++``) and ``-O3 -march=native``,
into a cache folder (``$QAT_JAX_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/qat_jax/kernels``, else
``~/.cache/qat_jax/kernels``), under a name that hashes everything the binary depends on: the
source, the flags, the compiler's version, jaxlib's version and the CPU's model and feature
flags (a home folder shared by different machines gets one binary per machine). Compiling writes
a temporary file and renames it into place, so concurrent processes (test workers, a
comparison's runs) never load a half-written library. A process loads each library once and
registers its FFI targets with XLA (a registry that is global to the process by XLA's design).

Without a working compiler the kernels are unavailable: :func:`load` raises
:class:`KernelUnavailable` with the compiler's first error line, and code that asked for a
kernel explicitly fails with that one line (nothing falls back silently).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

__all__ = ["KernelUnavailable", "cache_dir", "load"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")


class KernelUnavailable(RuntimeError):
    """A compiled kernel could not be built or loaded on this machine."""


def cache_dir(environ=None) -> str:
    """The folder compiled kernels are cached in (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("QAT_JAX_KERNEL_CACHE"):
        return env["QAT_JAX_KERNEL_CACHE"]
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qat_jax", "kernels")


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise KernelUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
    return cxx


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"the C++ compiler {cxx!r} does not run: {e}") from None
    return out.stdout.splitlines()[0] if out.stdout else cxx


def library_path(name: str) -> str:
    """Build (if needed) the kernel ``<name>.cc`` and return its shared library's path."""
    import jax
    import jaxlib

    src = os.path.join(_HERE, f"{name}.cc")
    with open(src, "rb") as f:
        source = f.read()
    cxx = _compiler()
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join(_FLAGS).encode(),
                _compiler_version(cxx).encode(),
                jaxlib.__version__.encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:16]
    out_dir = cache_dir()
    path = os.path.join(out_dir, f"{name}-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{include}", src, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            first = next((ln for ln in res.stderr.splitlines() if "error" in ln), "")
            raise KernelUnavailable(
                f"compiling {name}.cc failed ({cxx}, exit {res.returncode}): "
                f"{first or res.stderr.strip()[:200]}"
            )
        os.replace(tmp, path)  # atomic: another process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.cache
def load(name: str, targets: tuple[tuple[str, str], ...]) -> str:
    """Build and load kernel ``name`` and register its ``(target, symbol)`` FFI handlers on CPU.

    Returns the library's path. Raises :class:`KernelUnavailable` (one line) when it cannot be
    built or loaded. Cached per process: later calls return at once.
    """
    import jax

    path = library_path(name)
    try:
        lib = ctypes.CDLL(path)
        for target, symbol in targets:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
    except (OSError, AttributeError) as e:
        raise KernelUnavailable(f"loading {path} failed: {e}") from None
    return path
