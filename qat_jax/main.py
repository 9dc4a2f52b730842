"""Entry point: ``python -m qat_jax.main --config=configs/default.py --workdir=DIR``.

Runs (or resumes, with the same command) the configured job; any config key can be overridden
with ``--config.<key>=<value>``. All logic lives in :func:`qat_jax.train.train_and_evaluate`; the
multi-process setup in :mod:`qat_jax.train.distributed`. Every process of a multi-host job runs
the same command (see docs/operations.md).

Exit codes: 0 done (or halted by ``halt_after_step``), 1 a fault during the run (non-finite loss,
a checkpoint that could not be written), 2 bad input found before compute (config, dataset, init
checkpoint), 3 the multi-process setup failed (:data:`qat_jax.train.distributed.EXIT_CODE`).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qat_jax.hostenv import start_entry_point, tune_host
from qat_jax.train import compilation_cache, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.")
_DIST = flags.DEFINE_enum(
    "distributed",
    "auto",
    list(distributed.MODES),
    "Multi-process setup: auto (flags/env, else detect SLURM/TPU pod/Open MPI), on (always call "
    "jax.distributed.initialize, letting jax detect what is unset), off (one process).",
)
_COORD = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (env JAX_COORDINATOR_ADDRESS)."
)
_NPROC = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (env JAX_NUM_PROCESSES)."
)
_PID = flags.DEFINE_integer("process_id", None, "This process's id (env JAX_PROCESS_ID).")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join before failing."
)
_HEARTBEAT = flags.DEFINE_integer(
    "distributed_heartbeat", 100, "Seconds without a peer's heartbeat before the job stops."
)
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    compilation_cache.default_dir(),
    "JAX's persistent compilation cache: later runs of the same model load its compiled programs "
    "from here instead of compiling them ('' or 'none': off).",
)
flags.mark_flags_as_required(["config", "workdir"])

EXIT_FAULT, EXIT_BAD_INPUT = 1, 2


def _error(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _unknown_key(argv: list[str]) -> str:
    """One line naming the first ``--config.<key>`` of ``argv`` that the config file lacks."""
    from qat_jax.train.config_files import load_config_file

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config.") :].split("=")[0] for a in argv if a.startswith("--config.")]
    try:
        node = load_config_file(path) if path else None
    except Exception:  # noqa: BLE001 - a broken config file: fall back to a generic message
        node = None
    for key in overrides:
        cur, parts = node, key.split(".")
        for i, part in enumerate(parts):
            keys = list(cur.keys()) if hasattr(cur, "keys") else []
            if part not in keys:
                prefix = "".join(f"{p}." for p in parts[:i])
                close = [f"{prefix}{k}" for k in keys if k[:3] == part[:3]]
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                return (
                    f"unknown config key {key!r} (--config.{key}): {hint}check the spelling "
                    "against the keys of the --config file"
                )
            cur = cur[part]
    return "unknown config key in the --config.<key> overrides: check them against the config file"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with one-line errors for unknown config keys and wrong value types."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError):  # ml_collections: a --config.<key> that does not exist
        _error(_unknown_key(argv), EXIT_BAD_INPUT)
    except flags.Error as e:  # e.g. --config.batch_size=abc
        _error(f"{e}: pass a value of the key's type", EXIT_BAD_INPUT)
    return []


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    tune_host()  # before the XLA:CPU backend starts (see qat_jax/hostenv.py)
    try:
        compilation_cache.enable(_CACHE.value)
    except ValueError as e:
        _error(
            f"{e}: pass --compilation_cache_dir=DIR or --compilation_cache_dir=none", EXIT_BAD_INPUT
        )
    try:
        plan = distributed.resolve(
            _DIST.value,
            _COORD.value,
            _NPROC.value,
            _PID.value,
            _TIMEOUT.value,
            _HEARTBEAT.value,
        )
        distributed.initialize(plan)
    except distributed.DistributedError as e:
        _error(str(e), distributed.EXIT_CODE)

    from qat_jax.data import DataPrepareError
    from qat_jax.train import ConfigError, checkpoint, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, DataPrepareError) as e:
        _error(str(e), EXIT_BAD_INPUT)
    except (FloatingPointError, checkpoint.CheckpointWriteError) as e:
        _error(str(e), EXIT_FAULT)


if __name__ == "__main__":
    start_entry_point()  # once more with tcmalloc, if installed (hostenv.py)
    app.run(main, flags_parser=_parse_flags)
