"""Orbax checkpoints of the whole run: train state + a JSON record (controller, data, config).

* Paths are made absolute (orbax requires it); writes are atomic (orbax writes into a temporary
  ``<step>.orbax-checkpoint-tmp-*`` directory and renames it when complete), so only complete
  checkpoints are listed and read. Temporary directories left by a killed write are ignored and
  deleted when the next run opens the directory (``cleanup_tmp_directories``).
* Restores use an abstract target built from a freshly initialised state, so optax states come
  back with their types and shapes are checked.
* A latest checkpoint that cannot be read falls back to the previous complete one, with a warning.
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

import errno
import logging
import os
import shutil
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "RunCheckpointer",
    "CheckpointWriteError",
    "save_variables",
    "load_variables",
    "fault_point",
    "FAULT_ENV",
]

log = logging.getLogger(__name__)

FAULT_ENV = "QAT_JAX_FAULT"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left); the previous ones are intact."""


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
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(like_state)),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                log.warning(
                    "checkpoint %d in %s is unreadable (%s); trying the previous one",
                    step,
                    self.directory,
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
                continue
            return step, out["state"], dict(out["meta"])
        return None

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
