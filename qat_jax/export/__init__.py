"""Deployment: a bit-packed ``.qat`` file and a packed XNOR-popcount forward in JAX.

* :func:`export_run` (``python -m qat_jax.export --workdir=DIR --out=model.qat``) writes the final
  model of a run: each binary conv's ``B`` packed 1 bit per weight, its ``alpha``, its activation
  thresholds ``tau``, the following BN folded into a per-channel affine, and the FP layers (stem,
  classifier) as float32 -- no latent weights, no transform;
* :func:`load_packed` reads a file back; ``PackedModel(x)`` runs the packed forward;
* :func:`load_run_variables` restores a run's final model (for evaluation or export); it lives in
  :mod:`qat_jax.train.checkpoint`, the one reader of a run's checkpoints.

The byte layout is documented in docs/deployment.md. Importing the package loads only the light
modules (format, graph, packed forward); the names that read checkpoints (orbax) are imported on
first use.
"""

from qat_jax.export.fileformat import FormatError, read_container, write_container
from qat_jax.export.graph import ExportError, GraphBuilder, build_graph
from qat_jax.export.inference import make_packed_forward, packed_forward
from qat_jax.export.packing import binary_conv_packed, pack_rows, unpack_rows

__all__ = [
    "ExportError",
    "FormatError",
    "GraphBuilder",
    "PackedModel",
    "RunVariables",
    "binary_conv_packed",
    "build_graph",
    "export_model",
    "export_run",
    "load_packed",
    "packed_and_eval_logits",
    "load_run_variables",
    "make_packed_forward",
    "pack_rows",
    "packed_forward",
    "read_container",
    "unpack_rows",
    "write_container",
]

_MODEL_FILE = (
    "PackedModel",
    "export_model",
    "export_run",
    "load_packed",
    "packed_and_eval_logits",
    "verify_packed",
)
_CHECKPOINT = ("RunVariables", "load_run_variables")


def __getattr__(name: str):
    if name in _MODEL_FILE:
        from qat_jax.export import model_file

        return getattr(model_file, name)
    if name in _CHECKPOINT:
        from qat_jax.train import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
