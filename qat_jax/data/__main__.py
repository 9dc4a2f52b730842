"""``python -m qat_jax.data --dataset=NAME --manual_dir=DIR --data_dir=DIR``: prepare a dataset.

Converts local source files into a TFDS ArrayRecord data dir with the library
:func:`qat_jax.data.prepare` (:mod:`qat_jax.data.preparation`; docs/data.md). Idempotent: a
second run says the dataset is already prepared and does nothing. Exit code 1 with a one-line
error for missing or corrupt sources.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from qat_jax.data import registry
from qat_jax.data.preparation import prepare
from qat_jax.data.sources import DataPrepareError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m qat_jax.data",
        description="Convert local dataset files into a TFDS ArrayRecord data dir (no TF).",
    )
    parser.add_argument("--dataset", required=True, choices=sorted(registry.SPECS))
    parser.add_argument("--manual_dir", default=None, help="directory with the source files")
    parser.add_argument(
        "--data_dir",
        default=None,
        help=f"TFDS data dir (default ${registry.DATA_DIR_ENV} or ~/tensorflow_datasets)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if prepared")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    data_dir = registry.resolve_data_dir(args.data_dir)
    existing = registry.find_builder_dir(args.dataset, data_dir)
    if existing is not None and not args.force:
        print(f"{args.dataset} is already prepared at {existing}; nothing to do.")
        return 0
    try:
        path = prepare(
            args.dataset,
            args.manual_dir,
            data_dir,
            progress=not args.no_progress,
            force=args.force,
        )
    except (FileNotFoundError, DataPrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.dataset} prepared at {path} ({_du(path)})")
    return 0


def _du(path: str) -> str:
    total = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )
    return f"{total / 2**20:.1f} MiB"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
