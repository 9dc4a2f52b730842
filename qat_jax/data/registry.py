"""Per-dataset constants and the location of prepared TFDS data dirs.

A prepared dataset lives where TFDS expects it: ``<data_dir>/<name>/<version>/`` holding
``dataset_info.json``, ``features.json`` and ``<name>-<split>.array_record-XXXXX-of-YYYYY``
files. The names, versions and feature specs of the datasets prepared here are the ones of the
stock TFDS builders, so a directory made by ``tfds build <name> --file_format=array_record`` on a
machine with TensorFlow is interchangeable with one made by :func:`qat_jax.data.prepare`.
"""

from __future__ import annotations

import dataclasses
import os
import re

__all__ = [
    "DatasetSpec",
    "SPECS",
    "get_spec",
    "resolve_data_dir",
    "resolve_manual_dir",
    "find_builder_dir",
    "prepare_command",
]

DATA_DIR_ENV = "QAT_JAX_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one supported dataset.

    Attributes:
      name: TFDS name.
      version: TFDS version written by :func:`qat_jax.data.prepare` (and preferred when reading).
      image_shape: native (H, W, C), or None when images have variable size (ImageNet).
      mean, std: per-channel normalisation constants on the [0, 1] pixel scale.
      default_augment: what ``augment='auto'`` means for this dataset.
      default_manual_dir: where the raw files are looked for when ``manual_dir`` is None.
      local_prepare: whether :func:`qat_jax.data.prepare` can build it from local files.
      eval_resize: ImageNet-style eval (resize shorter side to ``size / crop_frac``, centre crop).
    """

    name: str
    version: str
    image_shape: tuple[int, int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_augment: str
    default_manual_dir: str | None
    local_prepare: bool
    eval_resize: bool = False
    crop_frac: float = 0.875


SPECS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        version="3.0.1",
        image_shape=(28, 28, 1),
        mean=(0.2860,),
        std=(0.3530,),
        default_augment="none",
        default_manual_dir="/usr/share/datasets/fashion-mnist",
        local_prepare=True,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        version="3.0.2",
        image_shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        default_augment="crop_flip",
        default_manual_dir=None,
        local_prepare=True,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        version="3.0.2",
        image_shape=(32, 32, 3),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        default_augment="crop_flip",
        default_manual_dir=None,
        local_prepare=True,
    ),
    "imagenet2012": DatasetSpec(
        name="imagenet2012",
        version="5.1.0",
        image_shape=None,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        default_augment="rrc_flip",
        default_manual_dir=None,
        local_prepare=False,
        eval_resize=True,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """Returns the :class:`DatasetSpec` of ``name`` or raises ValueError listing the choices."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; supported: {sorted(SPECS)}") from None


def resolve_data_dir(data_dir: str | None) -> str:
    """``data_dir`` if given, else ``$QAT_JAX_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir:
        return os.path.expanduser(os.fspath(data_dir))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return os.path.expanduser(env)
    return os.path.expanduser("~/tensorflow_datasets")


def resolve_manual_dir(name: str, manual_dir: str | None, data_dir: str) -> str:
    """``manual_dir`` if given, else the dataset default, else ``<data_dir>/downloads/manual``."""
    if manual_dir:
        return os.path.expanduser(os.fspath(manual_dir))
    spec = get_spec(name)
    if spec.default_manual_dir:
        return spec.default_manual_dir
    return os.path.join(data_dir, "downloads", "manual")


_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def find_builder_dir(name: str, data_dir: str) -> str | None:
    """Returns ``<data_dir>/<name>/<version>`` of a complete prepared dataset, or None.

    Complete means the version directory has a ``dataset_info.json`` (written last, and the
    directory itself only appears by an atomic rename). The spec's version is preferred,
    otherwise the highest version present.
    """
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        return None
    spec = SPECS.get(name)
    candidates = []
    for entry in os.listdir(root):
        if not _VERSION_RE.match(entry):
            continue
        if os.path.isfile(os.path.join(root, entry, "dataset_info.json")):
            candidates.append(entry)
    if not candidates:
        return None
    if spec is not None and spec.version in candidates:
        return os.path.join(root, spec.version)
    best = max(candidates, key=lambda v: tuple(int(x) for x in v.split(".")))
    return os.path.join(root, best)


def prepare_command(name: str, data_dir: str, manual_dir: str | None = None) -> str:
    """The shell command that prepares ``name`` (used in error messages)."""
    spec = get_spec(name)
    if not spec.local_prepare:
        return (
            f"tfds build {name} --file_format=array_record --data_dir={data_dir} "
            "(on a machine with TensorFlow; see docs/data.md)"
        )
    md = manual_dir or spec.default_manual_dir or "<dir with the downloaded archive>"
    return f"python -m qat_jax.data --dataset={name} --manual_dir={md} --data_dir={data_dir}"
