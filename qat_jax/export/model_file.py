"""Export a finished run to a ``.qat`` file and load one back as a packed model.

* :func:`export_run` reads a run's final model with
  :func:`qat_jax.train.checkpoint.load_run_variables` (the newest readable checkpoint; the model
  is rebuilt from the config saved in it);
* :func:`export_model` / :func:`export_run` write the ``.qat`` file (format: docs/deployment.md);
* :func:`load_packed` reads it back as a :class:`PackedModel` whose ``__call__`` is the packed
  XNOR-popcount forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax import data as qdata
from qat_jax.data import registry
from qat_jax.export import fileformat, graph
from qat_jax.export.inference import make_packed_forward
from qat_jax.export.packing import WORD_BITS
from qat_jax.train.checkpoint import load_run_variables

__all__ = [
    "FORMAT_NAME",
    "PackedModel",
    "export_model",
    "export_run",
    "load_packed",
    "packed_and_eval_logits",
    "verify_packed",
]

FORMAT_NAME = "qat_jax.packed"


@dataclasses.dataclass
class PackedModel:
    """A loaded ``.qat`` file: ``header`` (JSON), ``tensors`` (numpy) and the packed forward."""

    header: dict
    tensors: dict[str, np.ndarray]

    def __post_init__(self):
        self._fn = make_packed_forward(self.header["ops"])
        self._device_tensors = None

    def __call__(self, x, batch_size: int = 256) -> np.ndarray:
        """Logits ``[N, classes]`` of NHWC float32 ``x`` (preprocessed as in ``header['input']``)."""
        if self._device_tensors is None:
            self._device_tensors = {k: jnp.asarray(v) for k, v in self.tensors.items()}
        x = np.asarray(x, np.float32)
        outs = [
            np.asarray(self._fn(self._device_tensors, x[i : i + batch_size]))
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(outs, axis=0)

    def binary_bits(self) -> int:
        """Number of binary weights (= bits of packed payload actually used)."""
        return sum(
            int(op["d"]) * int(op["c_out"])
            for op in self.header["ops"]
            if op["op"] == "binary_conv"
        )


def export_model(
    path: str,
    model,
    variables: Mapping,
    input_shape: tuple[int, int, int],
    extra: Mapping | None = None,
) -> int:
    """Write ``model`` with ``variables`` as a ``.qat`` file; returns the file size in bytes."""
    ops, tensors = graph.build_graph(model, variables, input_shape[-1])
    header = {
        "format": FORMAT_NAME,
        "version": fileformat.VERSION,
        "word_bits": WORD_BITS,
        "bit_order": "lsb_first",
        "byte_order": "little",
        "bit_values": {"1": 1, "0": -1},
        "input": {"layout": "NHWC", "shape": list(input_shape), "dtype": "float32"},
        "output": ops[-1]["out"],
        "bn_epsilon": graph.BN_EPSILON,
        "ops": ops,
        **({"extra": dict(extra)} if extra else {}),
    }
    return fileformat.write_container(path, header, tensors)


def export_run(workdir: str, out: str, step: int | None = None) -> int:
    """Export the final model of a run (``<workdir>/checkpoints``) to ``out``; returns bytes.

    ``step=None``: the newest readable checkpoint (a corrupt latest one falls back, with a
    warning naming the step used, see :func:`~qat_jax.train.checkpoint.load_run_variables`).
    """
    run = load_run_variables(workdir, step)
    extra: dict[str, Any] = {
        "method": run.config.method,
        "model": run.config.model.to_dict(),
        "dataset": run.config.dataset.name,
        "step": run.step,
    }
    try:
        spec = registry.get_spec(run.config.dataset.name)
        extra["normalize"] = {
            "scale": "x / 255",
            "mean": list(spec.mean),
            "std": list(spec.std),
            "image_size": int(run.config.dataset.image_size),
        }
    except (KeyError, ValueError):
        pass
    return export_model(out, run.model, run.variables, run.input_shape, extra)


def load_packed(path: str) -> PackedModel:
    """Read a ``.qat`` file (any version-1 file) as a :class:`PackedModel`."""
    header, tensors = fileformat.read_container(path)
    if header.get("format") != FORMAT_NAME:
        raise fileformat.FormatError(f"{path}: header format {header.get('format')!r}")
    return PackedModel(header, tensors)


def packed_and_eval_logits(run, packed: PackedModel, batch_size: int = 250):
    """The packed forward and the run's eval logits (``model.apply``) on the run's whole eval split.

    ``run``: :func:`load_run_variables`'s result; ``packed``: :func:`load_packed`'s. Returns
    ``(packed_logits, eval_logits, labels)`` over the unpadded eval examples, in order.
    """
    apply = jax.jit(lambda v, z: run.model.apply(v, z, train=False))
    got, want, labels = [], [], []
    for batch in qdata.make_eval_batches(run.config.dataset, batch_size, num_local_devices=1):
        keep = np.asarray(batch["mask"][0]) > 0
        x = np.asarray(batch["image"][0])[keep]
        want.append(np.asarray(apply(run.variables, x)))
        got.append(packed(x, batch_size=batch_size))
        labels.append(np.asarray(batch["label"][0])[keep])
    return tuple(np.concatenate(a) for a in (got, want, labels))


def verify_packed(workdir: str, path: str, batch_size: int = 250) -> dict:
    """Packed forward of ``path`` vs the run's eval logits (``model.apply``) on its eval split.

    The eval side is the checkpoint the file was exported from (the ``step`` in its header, e.g.
    ``python -m qat_jax.export --step=N``), so an export of an earlier step is compared with that
    step's model, not with the run's latest.

    Returns:
      ``examples``, ``max_abs_diff`` and ``max_rel_diff`` of the logits (relative to the largest
      eval logit), ``prediction_mismatches``, ``packed_accuracy`` and ``eval_accuracy``.
    """
    packed = load_packed(path)
    step = packed.header.get("extra", {}).get("step")
    got, want, labels = packed_and_eval_logits(
        load_run_variables(workdir, step), packed, batch_size
    )
    n = len(labels)
    max_abs = float(np.abs(got - want).max()) if n else 0.0
    max_logit = float(np.abs(want).max()) if n else 0.0
    mismatches = int(np.sum(got.argmax(-1) != want.argmax(-1)))
    correct_packed = int(np.sum(got.argmax(-1) == labels))
    correct_eval = int(np.sum(want.argmax(-1) == labels))
    return {
        "examples": n,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(max_logit, 1e-30),
        "prediction_mismatches": mismatches,
        "packed_accuracy": correct_packed / max(n, 1),
        "eval_accuracy": correct_eval / max(n, 1),
    }
