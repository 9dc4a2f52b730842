"""Entry point: ``python -m qat_jax.main --config=configs/default.py --workdir=DIR``.

Runs (or resumes, with the same command) the configured job; any config key can be overridden
with ``--config.<key>=<value>``. All logic lives in :func:`qat_jax.train.train_and_evaluate`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qat_jax.hostenv import tune_malloc
from qat_jax.train import ConfigError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    tune_malloc()  # before the XLA:CPU backend starts (see qat_jax/hostenv.py)
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
