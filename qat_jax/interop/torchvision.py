"""FP weights in torchvision's ``state_dict`` layout <-> our Flax ``params``/``batch_stats``.

Name mapping (built from the model's structure, so reduced-depth variants map too):

=================================  ================================================
torchvision ``mobilenet_v2``       qat_jax ``MobileNetV2``
=================================  ================================================
``features.0.0`` / ``features.0.1``            ``stem`` / ``stem_bn``
``features.{i+1}.conv.0.0`` / ``.conv.0.1``    ``block{i}/expand`` / ``expand_bn`` (t != 1)
``features.{i+1}.conv.{1.0,1.1}``              ``block{i}/depthwise`` / ``depthwise_bn``
``features.{i+1}.conv.{2,3}``                  ``block{i}/project`` / ``project_bn``
  (t = 1: ``conv.0.0``/``conv.0.1`` depthwise, ``conv.1``/``conv.2`` project)
``features.{n+1}.0`` / ``.1``                  ``head_conv`` / ``head_bn``
``classifier.1``                               ``classifier``
=================================  ================================================

=================================  ================================================
torchvision ``resnet18`` (and any BasicBlock ResNet)  qat_jax ``ResNet``
=================================  ================================================
``conv1`` / ``bn1``                            ``stem`` / ``stem_bn``
``layer{s}.{j}.conv1`` .. ``bn2``              ``block{k}/conv1`` .. ``bn2`` (k counts blocks)
``layer{s}.{j}.downsample.0`` / ``.1``         ``block{k}/shortcut`` / ``shortcut_bn``
``fc``                                         ``classifier``
=================================  ================================================

Tensors: conv ``weight`` OIHW -> HWIO ``kernel``; linear ``weight`` ``[out, in]`` -> ``kernel``
``[in, out]``; BN ``weight``/``bias`` -> ``params`` ``scale``/``bias``, ``running_mean``/
``running_var`` -> ``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` is accepted and
ignored. Our variables that torchvision does not have (quantizer state, RPReLU) keep their values.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from qat_jax.interop.safetensors_io import read_safetensors, write_safetensors
from qat_jax.models import MobileNetV2
from qat_jax.models.resnet import ResNet
from qat_jax.tree import get_path, set_path

__all__ = [
    "TORCH_SUFFIXES",
    "TorchImportError",
    "is_torch_checkpoint",
    "read_state_dict",
    "torchvision_key_map",
    "load_torchvision",
    "load_torchvision_file",
    "to_torchvision_state_dict",
    "save_torchvision_safetensors",
]

TORCH_SUFFIXES = (".pth", ".pt", ".safetensors")
_IGNORED = "num_batches_tracked"


class TorchImportError(ValueError):
    """A state_dict that does not fit the model: lists every missing/unexpected/misshapen key."""


def is_torch_checkpoint(path: str) -> bool:
    """Whether ``path`` names a PyTorch/safetensors weight file (by its suffix)."""
    return str(path).endswith(TORCH_SUFFIXES)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """``{key: numpy array}`` of a ``.safetensors`` file or a ``.pth``/``.pt`` torch file.

    ``.pth`` files are read with ``torch.load(..., weights_only=True)`` (needs the ``torch``
    extra); a checkpoint dict wrapping the weights under ``'state_dict'`` or ``'model'`` is
    unwrapped and a DataParallel ``module.`` prefix is dropped.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file at {path}")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                f"reading {path} needs PyTorch: pip install -e '.[torch]' (or convert it to "
                ".safetensors)"
            ) from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise TorchImportError(f"{path}: expected a state_dict, got {type(obj).__name__}")
        sd = {
            k: (v.float() if v.is_floating_point() else v).detach().cpu().numpy()
            for k, v in obj.items()
            if hasattr(v, "detach")
        }
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _conv(mapping, prefix, path):
    mapping[f"{prefix}.weight"] = ("params", (*path, "kernel"), "conv")


def _bn(mapping, prefix, path):
    for torch_name, coll, ours in (
        ("weight", "params", "scale"),
        ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var"),
    ):
        mapping[f"{prefix}.{torch_name}"] = (coll, (*path, ours), "vector")


def _linear(mapping, prefix, path):
    mapping[f"{prefix}.weight"] = ("params", (*path, "kernel"), "linear")
    mapping[f"{prefix}.bias"] = ("params", (*path, "bias"), "vector")


def torchvision_key_map(model, variables: Mapping) -> dict[str, tuple[str, tuple, str]]:
    """``{torch key: (collection, path, kind)}`` for ``model``; kind: conv | linear | vector."""
    params = variables["params"]
    m: dict[str, tuple[str, tuple, str]] = {}
    if isinstance(model, MobileNetV2):
        _conv(m, "features.0.0", ("stem",))
        _bn(m, "features.0.1", ("stem_bn",))
        block = 0
        while f"block{block}" in params:
            blk, f = f"block{block}", f"features.{block + 1}.conv"
            if "expand" in params[blk]:
                _conv(m, f"{f}.0.0", (blk, "expand"))
                _bn(m, f"{f}.0.1", (blk, "expand_bn"))
                dw, pj = f"{f}.1", (f"{f}.2", f"{f}.3")
            else:
                dw, pj = f"{f}.0", (f"{f}.1", f"{f}.2")
            _conv(m, f"{dw}.0", (blk, "depthwise"))
            _bn(m, f"{dw}.1", (blk, "depthwise_bn"))
            _conv(m, pj[0], (blk, "project"))
            _bn(m, pj[1], (blk, "project_bn"))
            block += 1
        _conv(m, f"features.{block + 1}.0", ("head_conv",))
        _bn(m, f"features.{block + 1}.1", ("head_bn",))
        _linear(m, "classifier.1", ("classifier",))
    elif isinstance(model, ResNet):
        _conv(m, "conv1", ("stem",))
        _bn(m, "bn1", ("stem_bn",))
        block = 0
        for s, n in enumerate(model.stage_sizes, start=1):
            for j in range(int(n)):
                blk, f = f"block{block}", f"layer{s}.{j}"
                for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                    _conv(m, f"{f}.{conv}", (blk, conv))
                    _bn(m, f"{f}.{bn}", (blk, bn))
                if "shortcut" in params[blk]:
                    _conv(m, f"{f}.downsample.0", (blk, "shortcut"))
                    _bn(m, f"{f}.downsample.1", (blk, "shortcut_bn"))
                block += 1
        _linear(m, "fc", ("classifier",))
    else:
        raise TorchImportError(f"no torchvision layout for {type(model).__name__}")
    return m


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(x, (3, 2, 0, 1))  # HWIO -> OIHW
    if kind == "linear":
        return np.transpose(x, (1, 0))
    return x


def _from_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(x, (2, 3, 1, 0))  # OIHW -> HWIO
    if kind == "linear":
        return np.transpose(x, (1, 0))
    return x


def load_torchvision(state_dict: Mapping[str, Any], model, variables: Mapping) -> dict:
    """A copy of ``variables`` with ``params``/``batch_stats`` taken from a torchvision state_dict.

    Args:
      state_dict: ``{key: array}`` (numpy or torch tensors) in torchvision's layout.
      model: the Flax model (:class:`MobileNetV2` or a :class:`ResNet`).
      variables: initialised variables of ``model`` (structure and untouched collections).

    Raises:
      TorchImportError: listing every missing, unexpected and misshapen key.
    """
    variables = flax.core.unfreeze(variables)
    mapping = torchvision_key_map(model, variables)
    sd = {
        k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()
    }
    bn_prefixes = {k.rsplit(".", 1)[0] for k, (_, _, kind) in mapping.items() if "running" in k}
    missing = [k for k in mapping if k not in sd]
    unexpected = [
        k
        for k in sd
        if k not in mapping and not (k.endswith(_IGNORED) and k.rsplit(".", 1)[0] in bn_prefixes)
    ]
    misshapen = []
    out = copy.deepcopy({k: variables[k] for k in ("params", "batch_stats")})
    for key, (coll, path, kind) in mapping.items():
        if key not in sd:
            continue
        ours = get_path(variables[coll], path)
        want = _to_torch(kind, np.zeros(np.shape(ours), np.int8)).shape
        if tuple(sd[key].shape) != tuple(want):
            misshapen.append(f"{key}: got {tuple(sd[key].shape)}, expected {tuple(want)}")
            continue
        value = _from_torch(kind, sd[key].astype(np.float32))
        out[coll] = set_path(out[coll], path, np.ascontiguousarray(value))
    if missing or unexpected or misshapen:
        parts = [f"state_dict does not fit {type(model).__name__}:"]
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("misshapen", misshapen),
        ):
            if keys:
                parts.append(f"  {len(keys)} {label} key(s): " + "; ".join(keys))
        raise TorchImportError("\n".join(parts))
    return {**variables, **out}


def load_torchvision_file(path: str, model, variables: Mapping) -> dict:
    """:func:`load_torchvision` of a ``.pth``/``.pt``/``.safetensors`` file."""
    try:
        return load_torchvision(read_state_dict(path), model, variables)
    except TorchImportError as e:
        raise TorchImportError(f"{path}: {e}") from None


def to_torchvision_state_dict(model, variables: Mapping) -> dict[str, np.ndarray]:
    """The inverse mapping: our FP ``params``/``batch_stats`` as a torchvision state_dict."""
    variables = flax.core.unfreeze(variables)
    out = {}
    for key, (coll, path, kind) in torchvision_key_map(model, variables).items():
        out[key] = np.ascontiguousarray(
            _to_torch(kind, np.asarray(get_path(variables[coll], path)))
        )
    return out


def save_torchvision_safetensors(path: str, model, variables: Mapping) -> None:
    """Write :func:`to_torchvision_state_dict` as ``.safetensors`` (readable by torch)."""
    write_safetensors(path, to_torchvision_state_dict(model, variables))
