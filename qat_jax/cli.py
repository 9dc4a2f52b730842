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


def flags_parser(
    command: str, flag_values: flags.FlagValues = flags.FLAGS
) -> Callable[[list[str]], list[str]]:
    """absl's parsing (``app.run(main, flags_parser=...)``) with a one-line error and exit code 2
    for a missing, clashing or unknown flag or a bad value, naming ``command --help``.

    ``flag_values``: the entry point's own flags (each CLI module keeps its flags and their
    validators apart, so importing two CLIs in one process, as the tests do, cannot make one's
    validators fail the other's parsing). Every call starts from the defaults, and ``--help``
    prints those flags. absl's own flags (``FLAGS``) are marked parsed with their defaults.
    """

    def parse(argv: list[str]) -> list[str]:
        if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
            print(f"usage: {command} [flags]\n\n{flag_values.get_help()}")
            sys.exit(0)
        flag_values.unparse_flags()
        try:
            rest = flag_values(argv)
        except flags.Error as e:
            sys.exit(error(f"{e} ({command} --help lists the flags)"))
        if flag_values is not flags.FLAGS and not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # app.run reads absl's own flags after parsing
        return rest

    return parse
