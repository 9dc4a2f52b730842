"""``python -m qat_jax.data --dataset=NAME --manual_dir=DIR --data_dir=DIR``: prepare a dataset.

Converts local source files into a TFDS ArrayRecord data dir with the library
:func:`qat_jax.data.prepare` (:mod:`qat_jax.data.preparation`; docs/data.md). Idempotent: a
second run says the dataset is already prepared and does nothing. absl flags, like the other
entry points. Exit codes: 0 done (or already prepared), 2 bad input -- a missing or unknown flag
value, missing or corrupt source files -- with a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging

from qat_jax import cli
from qat_jax.data import registry
from qat_jax.data.preparation import prepare
from qat_jax.data.sources import DataPrepareError

__all__ = ["main", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT

#: This entry point's flags (kept apart from every other module's: qat_jax.cli).
FLAGS = flags.FlagValues()
_DATASET = flags.DEFINE_enum(
    "dataset",
    None,
    sorted(registry.SPECS),
    "The dataset to prepare (its stock TFDS name).",
    flag_values=FLAGS,
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Directory with the source files.", flag_values=FLAGS
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    f"TFDS data dir (default ${registry.DATA_DIR_ENV} or ~/tensorflow_datasets).",
    flag_values=FLAGS,
)
_FORCE = flags.DEFINE_bool(
    "force", False, "Rebuild even if the dataset is prepared.", flag_values=FLAGS
)
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Hide the progress bar.", flag_values=FLAGS)
flags.mark_flags_as_required(["dataset"], flag_values=FLAGS)


#: absl's parsing; a missing --dataset, an unknown name or flag, a bad bool: one line, exit 2.
parse_flags = cli.flags_parser("python -m qat_jax.data", FLAGS)


def main(argv: list[str]) -> int:
    """Prepare the flagged dataset; returns the process exit code (``app.run`` exits with it)."""
    if len(argv) > 1:
        return cli.error(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    data_dir = registry.resolve_data_dir(_DATA_DIR.value)
    name = _DATASET.value
    existing = registry.find_builder_dir(name, data_dir)
    if existing is not None and not _FORCE.value:
        print(f"{name} is already prepared at {existing}; nothing to do.")
        return 0
    try:
        path = prepare(
            name,
            _MANUAL_DIR.value,
            data_dir,
            progress=not _NO_PROGRESS.value,
            force=_FORCE.value,
        )
    except (FileNotFoundError, DataPrepareError) as e:
        return cli.error(str(e))
    print(f"{name} prepared at {path} ({_du(path)})")
    return 0


def _du(path: str) -> str:
    total = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )
    return f"{total / 2**20:.1f} MiB"


def _run(argv: list[str]) -> int:
    # The progress lines of the preparation, plain (``app.run`` logs at INFO through absl).
    absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(message)s"))
    return main(argv)


if __name__ == "__main__":
    app.run(_run, flags_parser=parse_flags)
