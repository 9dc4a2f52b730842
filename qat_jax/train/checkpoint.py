"""Orbax checkpoints of the whole run: train state + a JSON record (controller, data, config).

* Paths are made absolute (orbax requires it); writes are atomic (orbax finalises a temporary
  directory by renaming it), so only complete checkpoints are listed and read.
* Restores use an abstract target built from a freshly initialised state, so optax states come
  back with their types and shapes are checked.
* A latest checkpoint that cannot be read falls back to the previous complete one, with a warning.
* The FP teacher is written once to ``<workdir>/teacher`` and is never deleted by the rotation.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["RunCheckpointer", "save_variables", "load_variables"]

log = logging.getLogger(__name__)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpointer:
    """Periodic/stage-boundary checkpoints of ``(state, meta)`` under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
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
                    e,
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
