"""The layering, kept honest: the import graph of ``qat_jax/`` has no cycle, nothing of the math core
or the model zoo imports from the layers above it, and light modules load nothing heavy.

The graph is read from the source with ``ast``: every ``import``/``from ... import`` statement at
any depth (function-level imports included, so a cycle held together by deferred imports still
fails). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg`` (its ``__init__``); importing a submodule is an edge to the submodule only.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "qat_jax")

#: The math core: pure quantization math and the layers built from it.
CORE = (
    "qat_jax.quantizers",
    "qat_jax.ops",
    "qat_jax.transform",
    "qat_jax.binarize",
    "qat_jax.layers",
    "qat_jax.activations",
    "qat_jax.shortcut",
    "qat_jax.tree",
)
#: What the core and the model zoo must never reach, directly or through another module.
ABOVE = (
    "qat_jax.train",
    "qat_jax.export",
    "qat_jax.data",
    "qat_jax.experiment",
    "qat_jax.config_checks",
)
#: Modules that import nothing of qat_jax (read on their own, importable from anywhere).
LEAVES = ("qat_jax.tree", "qat_jax.config_checks", "qat_jax.data.sources", "qat_jax.cli")


def _modules() -> dict[str, str]:
    """``{dotted module name: file}`` of every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[: -len(".py")]
            parts = rel.split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(dirpath, name)
    return out


def _edges(module: str, path: str, modules: dict[str, str]) -> set[str]:
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    out.add(name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("qat_jax"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    out.add(target)
                elif base in modules:
                    out.add(base)
    out.discard(module)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _edges(m, path, modules) for m, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """``{module: the module that imports it}`` of everything ``start`` reaches."""
    seen, todo = {start: ""}, [start]
    while todo:
        m = todo.pop()
        for n in graph.get(m, ()):
            if n not in seen:
                seen[n] = m
                todo.append(n)
    return seen


def _chain(parents: dict[str, str], end: str) -> str:
    chain = [end]
    while parents[chain[-1]]:
        chain.append(parents[chain[-1]])
    return " -> ".join(reversed(chain))


def test_the_graph_is_read():
    graph = _graph()
    assert graph["qat_jax.train.trainer"] >= {"qat_jax.experiment", "qat_jax.train.checkpoint"}
    assert "qat_jax.train.checkpoint" in graph["qat_jax.export.model_file"]
    # Function-level imports count (the lazy names of train/__init__.py).
    assert "qat_jax.train.trainer" in graph["qat_jax.train"]
    assert set(CORE) <= set(graph)


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_math_core_and_models_import_nothing_above_them():
    graph = _graph()
    lower = [*CORE, *(m for m in graph if m == "qat_jax.models" or m.startswith("qat_jax.models."))]
    bad = []
    for m in lower:
        parents = _reachable(graph, m)
        for n in parents:
            if n.startswith(tuple(f"{a}." for a in ABOVE)) or n in ABOVE:
                bad.append(_chain(parents, n))
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_leaf_modules_import_nothing_of_the_package():
    graph = _graph()
    assert {m: sorted(graph[m]) for m in LEAVES} == {m: [] for m in LEAVES}
    # The split modules are where the layering says: the CIFAR readers under the shared types,
    # the numeric-key table under the config -> objects module (which re-exports ConfigError).
    assert "qat_jax.data.sources" in graph["qat_jax.data.cifar_sources"]
    assert "qat_jax.config_checks" in graph["qat_jax.experiment"]
    from qat_jax import config_checks, experiment

    assert experiment.ConfigError is config_checks.ConfigError


#: The run's parts below the trainer (train/trainer.py composes them; none of them reaches it).
TRAINER_PARTS = (
    "qat_jax.train.boundaries",
    "qat_jax.train.calibrate",
    "qat_jax.train.checkpoint",
    "qat_jax.train.fp_init",
    "qat_jax.train.reporting",
    "qat_jax.train.stages",
    "qat_jax.train.steps",
    "qat_jax.train.timing",
)


def test_the_trainer_is_the_top_of_train():
    """Only the package's lazy ``train_and_evaluate`` imports the trainer, and no part of a run
    (stage boundaries, FP init, timing, report, ...) reaches it or the package above it."""
    graph = _graph()
    assert {m for m, edges in graph.items() if "qat_jax.train.trainer" in edges} == {
        "qat_jax.train"
    }
    direct = {"qat_jax.train.boundaries", "qat_jax.train.fp_init", "qat_jax.train.timing"}
    assert direct <= graph["qat_jax.train.trainer"]
    bad = []
    for m in TRAINER_PARTS:
        parents = _reachable(graph, m)
        bad += [
            _chain(parents, n) for n in ("qat_jax.train.trainer", "qat_jax.train") if n in parents
        ]
    assert not bad, "a part of the run imports upward:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "module",
    [
        "qat_jax.train.stages",
        "qat_jax.train.timing",
        "qat_jax.train.config_files",
        "qat_jax.export",
    ],
)
def test_light_modules_load_neither_orbax_nor_tfds(module):
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('orbax', 'tensorflow_datasets', 'qat_jax.train.trainer') "
        "if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]", (module, p.stdout)
