"""The persistent compilation cache the entry points enable (qat_jax/train/compilation_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from qat_jax.train import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import os, sys, time
import jax, jax.numpy as jnp
from qat_jax.train import compilation_cache
path = compilation_cache.enable(sys.argv[1], min_compile_seconds=0.0)
assert os.environ["JAX_COMPILATION_CACHE_DIR"] == path
events = []
jax.monitoring.register_event_listener(lambda e, **k: events.append(e))
f = jax.jit(lambda x: jnp.linalg.solve(x + 4.0 * jnp.eye(16), jnp.cos(x)).sum())
f(jnp.ones((16, 16))).block_until_ready()
print("HIT" if "/jax/compilation_cache/cache_hits" in events else "MISS")
"""


def _child(path: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, path],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]


def test_second_process_loads_the_program_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    assert _child(str(cache)) == "MISS"
    assert any(n.endswith("-cache") for n in os.listdir(cache)), os.listdir(cache)
    assert _child(str(cache)) == "HIT"


@pytest.fixture
def restore_jax_cache_config(monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAX_ENABLE_COMPILATION_CACHE", raising=False)
    before = jax.config.jax_enable_compilation_cache
    yield
    jax.config.update("jax_enable_compilation_cache", before)


@pytest.mark.parametrize("off", [None, "", "none", "NONE"])
def test_off_values_turn_the_cache_off(off, restore_jax_cache_config):
    assert compilation_cache.enable(off) is None
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    assert jax.config.jax_enable_compilation_cache is False
    assert os.environ["JAX_ENABLE_COMPILATION_CACHE"] == "false"  # child processes too


def test_off_overrides_a_directory_from_the_environment(tmp_path):
    # JAX reads JAX_COMPILATION_CACHE_DIR itself; --compilation_cache_dir=none must still mean off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
    code = (
        "import jax, jax.numpy as jnp\n"
        "from qat_jax.train import compilation_cache\n"
        "compilation_cache.enable('none')\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
        "jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.ones(8)).block_until_ready()\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (tmp_path / "xla").exists() or not os.listdir(tmp_path / "xla")


def test_unusable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="compilation cache directory"):
        compilation_cache.enable(str(blocker / "xla"))


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_dir() == os.path.join(str(tmp_path), "qat_jax", "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
    assert compilation_cache.default_dir() == "/somewhere/else"
