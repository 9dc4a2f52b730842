"""Loading config files by path (``configs/*.py`` are plain files, not an importable package)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

__all__ = ["load_config_file", "load_sibling"]


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path`` (what ``--config=path`` gives).

    ``path:arg`` calls ``get_config(arg)``, as ``ml_collections.config_flags`` does for
    ``--config=path:arg`` (e.g. ``configs/faithful.py:study``).
    """
    path, sep, arg = path.partition(":")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    name = "qat_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def load_sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
    """The config ``name`` next to ``config_file`` (pass ``__file__``), unlocked for overrides."""
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))
    config.unlock()
    return config
