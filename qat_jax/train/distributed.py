"""Multi-process setup: who initialises ``jax.distributed``, with what, and a fast clear failure.

One training job = one process per host (TPU VM worker, GPU node) or per GPU; every process runs
the same command. :func:`resolve` turns the flags of ``qat_jax.main`` and the environment into a
:class:`Plan` (a pure function, tested with fake environments); :func:`initialize` carries it out
before anything touches a jax backend.

Where the settings come from, first match wins:

1. ``--distributed=off``: one process, never initialise.
2. flags ``--coordinator_address`` / ``--num_processes`` / ``--process_id``, else the environment
   ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (``launch/local.sh``
   sets these): an explicit setup. A partial one is an error that names the missing setting.
3. auto-detection (``--distributed=auto``, the default): a SLURM step with more than one task
   (``SLURM_NTASKS`` > 1 and the variables jax's SLURM detection reads), a multi-host TPU VM slice
   (``TPU_WORKER_HOSTNAMES`` lists several hosts, or ``MEGASCALE_COORDINATOR_ADDRESS`` is set),
   or an Open MPI job (``OMPI_COMM_WORLD_SIZE`` > 1): jax's own cluster detection fills in the
   coordinator, process count and id.
4. ``--distributed=on`` without settings: call ``jax.distributed.initialize()`` and let jax detect
   the cluster (e.g. a Cloud TPU VM pod via its metadata server); otherwise one process.

A peer that never joins makes XLA's coordination client abort the process (a C++ ``LOG(FATAL)``,
no Python exception) after ``initialization_timeout``. A watchdog therefore exits first, after
``timeout_s``, with one line naming the fix and exit code :data:`EXIT_CODE`; jax's own deadline is
set a few seconds later.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Mapping

__all__ = ["EXIT_CODE", "DistributedError", "Plan", "resolve", "initialize", "MODES"]

MODES = ("auto", "on", "off")
EXIT_CODE = 3  # process exit code of a failed distributed setup (docs/operations.md)
_JAX_GRACE_S = 10  # jax's own initialization deadline is this much later than the watchdog


class DistributedError(RuntimeError):
    """The multi-process setup is inconsistent or a peer did not join."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`initialize` does. ``enabled=False``: a single process, nothing to do."""

    enabled: bool
    source: str  # 'off' | 'single' | 'flags' | 'env' | 'slurm' | 'tpu' | 'ompi' | 'jax-auto'
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def describe(self) -> str:
        if not self.enabled:
            return f"single process ({self.source})"
        who = (
            f"process {self.process_id} of {self.num_processes}"
            if self.num_processes is not None
            else "process id and count detected by jax"
        )
        where = self.coordinator_address or "coordinator detected by jax"
        return f"{who}, coordinator {where} (from {self.source}), timeout {self.timeout_s}s"


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _detect_cluster(env: Mapping[str, str]) -> str | None:
    """The cluster this process runs in, when it spans several processes (else ``None``)."""
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if (
        all(v in env for v in slurm_vars)
        and (_int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1
    ):
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    return None


def resolve(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
    environ: Mapping[str, str] | None = None,
) -> Plan:
    """The :class:`Plan` for these flags in this environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r}: use one of {', '.join(MODES)}")
    if timeout_s <= 0:
        raise DistributedError(f"--distributed_timeout={timeout_s}: must be > 0 seconds")
    times = {"timeout_s": int(timeout_s), "heartbeat_timeout_s": int(heartbeat_timeout_s)}
    if mode == "off":
        return Plan(False, "off", **times)

    source = "flags"
    addr, n, pid = coordinator_address or None, num_processes, process_id
    if addr is None and n is None and pid is None:
        source = "env"
        addr = env.get("JAX_COORDINATOR_ADDRESS") or None
        n = _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
        pid = _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
    given = {"coordinator_address": addr, "num_processes": n, "process_id": pid}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            flags_ = " ".join(f"--{k}" for k in missing)
            raise DistributedError(
                f"incomplete multi-process setup from {source}: also set {flags_} "
                "(or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID), "
                "or drop the others to run one process"
            )
        if n < 1 or not 0 <= pid < n:
            raise DistributedError(
                f"process_id={pid} and num_processes={n}: need num_processes >= 1 and "
                "0 <= process_id < num_processes (set --process_id/--num_processes)"
            )
        if ":" not in addr:
            raise DistributedError(
                f"coordinator_address={addr!r} needs a port, e.g. 10.0.0.1:12355 "
                "(set --coordinator_address)"
            )
        if n == 1:
            return Plan(False, "single", **times)
        return Plan(True, source, addr, n, pid, **times)

    cluster = _detect_cluster(env)
    if cluster is not None:
        return Plan(True, cluster, **times)
    if mode == "on":
        return Plan(True, "jax-auto", **times)
    return Plan(False, "single", **times)


def _watchdog_message(plan: Plan) -> str:
    n = plan.num_processes if plan.num_processes is not None else "all"
    return (
        f"error: distributed setup did not complete within {plan.timeout_s}s "
        f"({plan.describe()}): not all {n} processes joined; start every process with the same "
        "--coordinator_address/--num_processes and a distinct --process_id (process 0 hosts the "
        "coordinator and must be reachable), or raise --distributed_timeout"
    )


def initialize(
    plan: Plan,
    *,
    initialize_fn: Callable[..., None] | None = None,
    exit_fn: Callable[[int], None] = os._exit,
) -> bool:
    """Carry out ``plan`` (before any jax computation). Returns whether it initialised.

    A peer that has not joined within ``plan.timeout_s`` ends the process with one line on stderr
    and exit code :data:`EXIT_CODE`; a Python-level failure of jax's setup raises
    :class:`DistributedError`.
    """
    if not plan.enabled:
        return False
    if initialize_fn is None:
        import jax

        initialize_fn = jax.distributed.initialize

    def expire():
        print(_watchdog_message(plan), file=sys.stderr, flush=True)
        exit_fn(EXIT_CODE)

    kwargs = {
        "initialization_timeout": int(plan.timeout_s) + _JAX_GRACE_S,
        "heartbeat_timeout_seconds": int(plan.heartbeat_timeout_s),
    }
    if plan.coordinator_address is not None:
        kwargs.update(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
        )
    elif plan.source in ("slurm", "ompi"):
        kwargs["cluster_detection_method"] = plan.source
    watchdog = threading.Timer(float(plan.timeout_s), expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        initialize_fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - jax raises several types here; one clear message
        raise DistributedError(
            f"jax.distributed.initialize failed ({plan.describe()}): {e}; check the "
            "--coordinator_address/--num_processes/--process_id of every process"
        ) from e
    finally:
        watchdog.cancel()
    return True
