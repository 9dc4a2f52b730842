"""What the absl entry points share: a bad flag or input is one ``error:`` line and exit code 2.

Used by ``python -m qat_jax.data`` and ``python -m qat_jax.summary``; ``qat_jax.main`` adds its
config-key hints on top of the same convention.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags

__all__ = ["EXIT_BAD_INPUT", "error", "flags_parser"]

EXIT_BAD_INPUT = 2


def error(message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``error: <message>`` on stderr; returns ``code`` (the process exit code)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def flags_parser(command: str) -> Callable[[list[str]], list[str]]:
    """absl's parsing (``app.run(main, flags_parser=...)``) with a one-line error and exit code 2
    for a missing, clashing or unknown flag or a bad value, naming ``command --help``."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(error(f"{e} ({command} --help lists the flags)"))

    return parse
