"""Interop with PyTorch: torchvision-layout FP weights (``.pth`` or ``.safetensors``) <-> Flax.

* :func:`load_torchvision_file` (path, model, variables) -> variables with ``params`` and
  ``batch_stats`` from the file; :class:`TorchImportError` lists missing, unexpected and
  misshapen keys;
* :func:`to_torchvision_state_dict` / :func:`save_torchvision_safetensors`: the other way;
* ``config.init=<file>.pth|.safetensors`` makes the trainer start from such a file.

``.safetensors`` is read and written with numpy alone; ``.pth`` needs the ``torch`` extra.
"""

from qat_jax.interop.safetensors_io import read_safetensors, write_safetensors
from qat_jax.interop.torchvision import (
    TORCH_SUFFIXES,
    TorchImportError,
    is_torch_checkpoint,
    load_torchvision,
    load_torchvision_file,
    read_state_dict,
    save_torchvision_safetensors,
    to_torchvision_state_dict,
    torchvision_key_map,
)

__all__ = [
    "TORCH_SUFFIXES",
    "TorchImportError",
    "is_torch_checkpoint",
    "load_torchvision",
    "load_torchvision_file",
    "read_safetensors",
    "read_state_dict",
    "save_torchvision_safetensors",
    "to_torchvision_state_dict",
    "torchvision_key_map",
    "write_safetensors",
]
