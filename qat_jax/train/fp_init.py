"""The FP model of a run: its variables (the KD teacher's structure) and loading it from a file.

* :func:`fp_variables` -- the FP model (every layer's modes 0) of a host train state;
* :func:`load_fp_init` -- the FP model saved by an earlier run (its ``teacher``, any method) or
  torchvision-layout weights (:mod:`qat_jax.interop`), checked against this run's variables;
* :func:`with_fp_model` -- a train state that starts from such an FP model (``config.init``).
"""

from __future__ import annotations

import jax
import numpy as np

from qat_jax import interop
from qat_jax.experiment import ConfigError
from qat_jax.train import checkpoint
from qat_jax.train.state import TrainState

__all__ = ["fp_variables", "load_fp_init", "with_fp_model"]


def fp_variables(hstate: TrainState) -> dict:
    """The FP model's variables (every mode 0) from a host state: the teacher's structure."""
    qstate = jax.tree.map(np.zeros_like, hstate.state["qstate"])
    return {**hstate.params, **hstate.state, "qstate": qstate}


def with_fp_model(hstate: TrainState, fp_vars: dict) -> TrainState:
    """``hstate`` with the FP model's ``params`` and ``batch_stats`` from ``fp_vars``."""
    return hstate.replace(
        params={**hstate.params, "params": fp_vars["params"]},
        state={**hstate.state, "batch_stats": fp_vars["batch_stats"]},
    )


def load_fp_init(path: str, like: dict, model=None) -> dict:
    """The FP model (``params`` and ``batch_stats``) saved at ``path`` onto this run's variables.

    ``path`` is the ``teacher`` of an earlier run, whatever its method: only the FP model is read
    (its quantizer variables, if any, are ignored); or a torchvision-layout file (``.pth``,
    ``.safetensors``; then ``model`` is needed). ``like`` is this run's :func:`fp_variables`.
    Variables that exist only in this method's model (ReActNet's RPReLU parameters, active only
    after binary convs) keep their initial values, so the FP function is unchanged.

    Raises:
      ConfigError: (one line) the file misses FP variables of this model or has misshapen ones.
    """
    if interop.is_torch_checkpoint(path):  # torchvision-layout weights (qat_jax.interop)
        try:
            return interop.load_torchvision_file(path, model, like)
        except interop.TorchImportError as e:
            raise ConfigError(str(e)) from None
    raw = checkpoint.load_variables(path, None)
    problems = []

    def fill(dst, src, where):
        out = {}
        for k, v in dst.items():
            name = "/".join((*where, k))
            if not isinstance(src, dict) or k not in src:
                new = k == "rprelu" or (isinstance(v, dict) and set(v) == {"rprelu"})
                if not new:  # RPReLU parameters are new in a reactnet model
                    problems.append(f"missing {name}")
                out[k] = v
            elif isinstance(v, dict):
                out[k] = fill(v, src[k], (*where, k))
            elif np.shape(src[k]) != np.shape(v):
                problems.append(f"{name} has shape {np.shape(src[k])}, expected {np.shape(v)}")
                out[k] = v
            else:
                out[k] = np.asarray(src[k], dtype=np.asarray(v).dtype)
        return out

    out = dict(like)
    for col in ("params", "batch_stats"):
        out[col] = fill(like[col], raw.get(col, {}), (col,))
    if problems:
        raise ConfigError(
            f"init checkpoint {path} does not fit this model ({len(problems)} problems: "
            f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}): check config.model"
        )
    return out
