"""Command line: ``python -m qat_jax.data.prepare --dataset=NAME --manual_dir=DIR --data_dir=DIR``.

Converts local source files into a TFDS ArrayRecord data dir (see
:mod:`qat_jax.data.preparation`). Idempotent: a second run says the dataset is already
prepared and does nothing. Exit code 1 with a one-line error for missing/corrupt sources.

``qat_jax.data.prepare`` is also the library function of the same name; this module stays
callable (``qat_jax.data.prepare(name, manual_dir, data_dir)``) even after something imports
the submodule explicitly, which would otherwise replace the package attribute.
"""

from __future__ import annotations

import logging
import sys
import types

from qat_jax.data.preparation import main
from qat_jax.data.preparation import prepare as _prepare

__all__ = ["main"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _prepare(*args, **kwargs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
