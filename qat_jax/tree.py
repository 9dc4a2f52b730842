"""Nested-dict helpers: address one leaf of a variables tree by its path of keys.

A model's variables are nested dicts (``{'params': {'block0': {'project': {'kernel': ...}}}}``);
a layer is addressed by the tuple of its module names (``('block0', 'project')``), as in
``QLayer.path``. These helpers walk such trees in *insertion order* (pytree flattening would sort
the keys) and never copy leaves. A leaf module: pure Python over ``Mapping``s, no jax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Path",
    "get_path",
    "set_path",
    "leaves_with_paths",
    "from_leaves_with_paths",
    "tree_paths",
    "map_with_path",
]

Path = tuple[str, ...]


def get_path(tree: Mapping, path: Path, default: Any = None) -> Any:
    """``tree[path[0]][path[1]]...``, or ``default`` where a key is missing."""
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def set_path(tree: Mapping, path: Path, value: Any) -> dict:
    """Functional update: a copy of the nested dict ``tree`` with ``tree[path] = value``.

    Only the dicts along ``path`` are copied; everything else is shared with ``tree``.
    """
    if not path:
        return value
    head, rest = path[0], path[1:]
    out = dict(tree)
    out[head] = set_path(dict(tree.get(head, {})), rest, value) if rest else value
    return out


def leaves_with_paths(tree: Mapping, prefix: Path = ()) -> list[tuple[Path, Any]]:
    """``(path, leaf)`` of every leaf of a nested dict, in insertion order."""
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(leaves_with_paths(value, prefix + (key,)))
        else:
            out.append((prefix + (key,), value))
    return out


def from_leaves_with_paths(items: list[tuple[Path, Any]]) -> dict:
    """The nested dict of ``(path, leaf)`` pairs (inverse of :func:`leaves_with_paths`)."""
    out: dict = {}
    for path, leaf in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def tree_paths(tree: Mapping, prefix: Path = ()) -> list[Path]:
    """All leaf paths of a nested dict, in insertion order."""
    return [path for path, _ in leaves_with_paths(tree, prefix)]


def map_with_path(fn: Callable[[Path, Any], Any], tree: Mapping, prefix: Path = ()) -> dict:
    """``fn(path, leaf)`` over every leaf of a nested dict (same structure, insertion order)."""
    return {
        k: map_with_path(fn, v, prefix + (k,)) if isinstance(v, Mapping) else fn(prefix + (k,), v)
        for k, v in tree.items()
    }
