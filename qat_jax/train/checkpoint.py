"""Orbax checkpoints of the whole run: train state + a JSON record (controller, data, config).

* Paths are made absolute (orbax requires it); writes are atomic (orbax writes into a temporary
  ``<step>.orbax-checkpoint-tmp-*`` directory and renames it when complete), so only complete
  checkpoints are listed and read. Temporary directories left by a killed write are ignored and
  deleted when the next run opens the directory (``cleanup_tmp_directories``).
* Restores use an abstract target built from a freshly initialised state, so optax states come
  back with their types and shapes are checked.
* A latest checkpoint that cannot be read falls back to the previous complete one, with a warning:
  when a run resumes (:meth:`RunCheckpointer.restore_latest`) and when its final model is read
  back (:func:`load_run_variables`, for the export and the summary), through one loop
  (:func:`_newest_readable`).
* A state with a NaN/Inf anywhere is never written (:class:`FloatingPointError`); a write that
  fails (e.g. a full disk) raises :class:`CheckpointWriteError` naming the last good checkpoint.
* Saving a step that already exists (a periodic checkpoint right before a stage boundary at the
  same step) replaces it: the later state of that step wins.
* The FP teacher is written once to ``<workdir>/teacher`` and is never deleted by the rotation.

Multi-process: the state is a host (numpy) pytree, identical on every process. Every process
calls :meth:`RunCheckpointer.save` (orbax synchronises them with barriers); orbax lets only the
primary process (0) write numpy leaves and the JSON record, and every process reads the same
files on restore. The checkpoint directory must therefore be shared by all processes (a network
filesystem or a ``gs://`` bucket on TPU pods).

Test hook (for real SIGKILL tests, ``tests/test_resume.py``): ``QAT_JAX_FAULT=save:<N>`` makes
the process SIGKILL itself inside the write of checkpoint ``N``, after its files are complete in
the temporary directory and before the rename that publishes it; ``QAT_JAX_FAULT=step:<N>`` (see
:func:`fault_point`, called by the trainer) right after train step ``N``. Unset, nothing changes.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import signal
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from qat_jax import experiment

__all__ = [
    "RunCheckpointer",
    "RunVariables",
    "CheckpointWriteError",
    "CheckpointReadError",
    "checkpoint_steps",
    "load_run_variables",
    "save_variables",
    "load_variables",
    "fault_point",
    "FAULT_ENV",
]

log = logging.getLogger(__name__)

FAULT_ENV = "QAT_JAX_FAULT"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left); the previous ones are intact."""


class CheckpointReadError(ValueError):
    """No checkpoint of a run could be read (each one's reason is in the message)."""


def fault_point(where: str, step: int) -> None:
    """Test hook: SIGKILL this process when ``$QAT_JAX_FAULT == f'{where}:{step}'``."""
    if os.environ.get(FAULT_ENV) == f"{where}:{int(step)}":
        os.kill(os.getpid(), signal.SIGKILL)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _nonfinite_leaves(tree) -> list[str]:
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(leaf)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            bad.append(jax.tree_util.keystr(path))
    return bad


def _reason(e: BaseException, limit: int = 160) -> str:
    """First line of an exception, with its type, at most ``limit`` characters:
    ``'JSONDecodeError: Unterminated string ...'`` (tensorstore's errors run to kilobytes)."""
    text = str(e).splitlines()[0] if str(e) else ""
    reason = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _newest_readable(
    steps: list[int], read: Callable[[int], Any], on_unreadable: Callable[[int, str], None]
) -> tuple[int, Any] | None:
    """``(step, read(step))`` of the newest step whose read succeeds, trying ``steps`` from the
    last one down; ``on_unreadable(step, reason)`` for each one that fails; ``None`` when none
    can be read (or there are none)."""
    for step in reversed(steps):
        try:
            return step, read(step)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
            on_unreadable(step, _reason(e))
    return None


def _errno_of(e: BaseException) -> int | None:
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


class _KillBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """The test hook: the temporary directory is complete, the rename has not happened."""

    async def finalize(self, *args, **kwargs):
        name = os.path.basename(str(self._final_path))
        if name.isdigit():  # the step directory (its items are finalised with it)
            fault_point("save", int(name))
        return await super().finalize(*args, **kwargs)


class RunCheckpointer:
    """Periodic/stage-boundary checkpoints of ``(state, meta)`` under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        extra = {}
        if os.environ.get(FAULT_ENV, "").startswith("save:"):
            extra["temporary_path_class"] = _KillBeforeCommit
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
                **extra,
            ),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write checkpoint ``step`` (every process calls this); the state must be finite."""
        step = int(step)
        bad = _nonfinite_leaves(state)
        if bad:
            raise FloatingPointError(
                f"refusing to write checkpoint {step}: non-finite values in {', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}; the last good checkpoint "
                f"({self._latest_text()}) is kept: lower the learning rate or check the data"
            )
        if step in self.manager.all_steps():
            self.manager.delete(step)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax wraps I/O errors in several types
            code = _errno_of(e)
            if code is None:
                raise
            self._remove_partial(step)  # frees the space the failed write took
            reason = os.strerror(code)
            fix = (
                "free disk space (or move --workdir to a larger disk)"
                if code in (errno.ENOSPC, errno.EDQUOT)
                else "check that the workdir is writable"
            )
            raise CheckpointWriteError(
                code,
                f"could not write checkpoint {step} in {self.directory} ({reason}); "
                f"{fix}, then rerun the same command: it resumes from the last complete "
                f"checkpoint ({self._latest_text(exclude=step)})",
            ) from e

    def _remove_partial(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.") and "tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _latest_text(self, exclude: int | None = None) -> str:
        steps = [s for s in self.steps() if s != exclude]
        return f"step {steps[-1]}" if steps else "none yet"

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, like_state: Any) -> tuple[int, Any, dict] | None:
        """``(step, state, meta)`` of the newest readable checkpoint, or ``None`` when none exists."""

        def read(step):
            return self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(like_state)),
                    meta=ocp.args.JsonRestore(),
                ),
            )

        def warn(step, reason):
            log.warning(
                "checkpoint %d in %s is unreadable (%s); trying the previous one",
                step,
                self.directory,
                reason,
            )

        found = _newest_readable(self.steps(), read, warn)
        if found is None:
            return None
        step, out = found
        return step, out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


def save_variables(path: str, variables: Any) -> None:
    """Write a pytree (e.g. the FP teacher's variables) to ``path`` atomically."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, variables, force=True)


def load_variables(path: str, like: Any) -> Any:
    """Read a pytree written by :func:`save_variables` onto the structure of ``like``."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, _abstract(like))


# ---------------------------------------------------------------------------------------------
# A run's final model, read back (export, summary, evaluation)


@dataclasses.dataclass
class RunVariables:
    """A run's final model: ``model.apply(variables, x, train=False)`` gives its eval logits.

    Attributes:
      model: the Flax module rebuilt from the saved config.
      variables: all collections (``params``, ``batch_stats``, ``qstate``, ``binary``, ...).
      config: the run's config (``ConfigDict``).
      step: the checkpoint's step.
      input_shape: ``(H, W, C)`` of the model's input.
      unreadable: ``(step, reason)`` of the newer checkpoints that could not be read, newest
        first (the fallback that gave ``step``); empty when the latest one was read.
    """

    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    step: int
    input_shape: tuple[int, int, int]
    unreadable: tuple[tuple[int, str], ...] = ()


def checkpoint_steps(directory: str) -> list[int]:
    """The complete checkpoints' steps in ``directory``, ascending (none: ``[]``).

    Complete checkpoints are the ``<step>`` directories (a killed write leaves only a
    ``<step>.orbax-checkpoint-tmp-*`` one).
    """
    if not os.path.isdir(directory):
        return []
    return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def _read_step(directory: str, step: int) -> tuple[dict, dict]:
    """``(state, meta)`` of checkpoint ``step``, read only (nothing in the run is touched)."""
    step_dir = os.path.join(directory, str(step))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(step_dir, "state"))
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        meta = ckptr.restore(os.path.join(step_dir, "meta"))
    return state, dict(meta)


def load_run_variables(workdir: str, step: int | None = None) -> RunVariables:
    """Read a run's checkpoint (default: the newest readable one, i.e. the final model of a
    finished run) and rebuild its model (:func:`qat_jax.experiment.create_model`) from the
    config saved in the checkpoint's record.

    The number of classes and input channels are read from the classifier and stem kernels.
    With ``step=None``, a latest checkpoint that cannot be read falls back to the previous
    complete one, as a resuming run does, with one warning naming the step used
    (``RunVariables.unreadable`` lists the ones skipped).

    Raises:
      FileNotFoundError: no checkpoint in ``<workdir>/checkpoints`` (or no checkpoint ``step``).
      CheckpointReadError: no checkpoint could be read (``step``, or every one).
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}: is {workdir} a run's workdir?")
    if step is not None:
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint {step} in {directory}: its checkpoints are steps {steps}"
            )
        steps = [int(step)]
    unreadable: list[tuple[int, str]] = []
    found = _newest_readable(
        steps,
        lambda s: _read_step(directory, s),
        lambda s, reason: unreadable.append((s, reason)),
    )
    if found is None:
        if step is not None:
            raise CheckpointReadError(
                f"checkpoint {step} in {directory} is unreadable ({unreadable[0][1]})"
            )
        reasons = "; ".join(f"checkpoint {s}: {reason}" for s, reason in unreadable)
        raise CheckpointReadError(f"no readable checkpoint in {directory} ({reasons})")
    step, (state, meta) = found
    if unreadable:
        newer = ", ".join(str(s) for s, _ in unreadable)
        log.warning(
            "%s %s in %s %s unreadable (%s); using step %d",
            "checkpoint" if len(unreadable) == 1 else "checkpoints",
            newer,
            directory,
            "is" if len(unreadable) == 1 else "are",
            unreadable[0][1],
            step,
        )
    config = ml_collections.ConfigDict(meta["config"])
    variables = jax.tree.map(np.asarray, {**state["params"], **state["state"]})
    num_classes = int(variables["params"]["classifier"]["kernel"].shape[-1])
    model = experiment.create_model(config, num_classes)
    size = int(config.dataset.image_size)
    channels = int(variables["params"]["stem"]["kernel"].shape[2])
    return RunVariables(model, variables, config, step, (size, size, channels), tuple(unreadable))
