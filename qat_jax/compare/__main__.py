"""``python -m qat_jax.compare --config=configs/compare_default.py --workdir=DIR``: the comparison CLI.

Runs the configured methods x seeds (one FP teacher per seed, equal QAT budgets), skipping runs
already finished in ``DIR``, then writes ``results.csv``, ``results.md``, ``comparison.png`` and
``stages.png``. All logic lives in the library, :func:`qat_jax.compare.run_comparison`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qat_jax.hostenv import start_entry_point, tune_host
from qat_jax.train import compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/compare_*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the comparison (one subdir per run).")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    compilation_cache.default_dir(),
    "JAX's persistent compilation cache, shared by every run of the comparison ('' or 'none': off).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    tune_host()  # before the XLA:CPU backend starts (see qat_jax/hostenv.py)
    try:
        compilation_cache.enable(_CACHE.value)  # the runs' child processes inherit it
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from qat_jax.compare import run_comparison
    from qat_jax.train import ConfigError

    try:
        run_comparison(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with open(f"{_WORKDIR.value}/results.md") as f:
        print(f.read())


if __name__ == "__main__":
    start_entry_point()  # once more with tcmalloc, if installed (hostenv.py)
    app.run(main)
