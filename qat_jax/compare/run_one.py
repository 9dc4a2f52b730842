"""``python -m qat_jax.compare.run_one RUN_DIR``: one run of a comparison, in its own process.

The comparison (:func:`qat_jax.compare.run_comparison`) starts one of these per run, on the config
it recorded in ``RUN_DIR/compare_run.json`` (:func:`qat_jax.compare.run_recorded`); users run
``python -m qat_jax.compare``.
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

from qat_jax.compare import run_recorded
from qat_jax.hostenv import tune_host

if __name__ == "__main__":
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    tune_host()  # before the XLA:CPU backend starts (see qat_jax/hostenv.py)
    run_recorded(sys.argv[1])
