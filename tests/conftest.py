"""Shared test setup.

Eight simulated CPU devices for the ``pmap`` tests: ``XLA_FLAGS`` must be set before jax is
imported (and before its backend initialises), so it is done here, at the top of the conftest that
pytest loads before any test module.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qat_jax.hostenv import tune_host  # noqa: E402

tune_host()  # XLA:CPU steps page-fault far less (qat_jax/hostenv.py); before the backend starts

N_DEVICES = 8


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
