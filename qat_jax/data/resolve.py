"""Data config -> a resolved dataset: which prepared TFDS directory, splits, labels and preprocessing.

:func:`resolve` is the one place that opens a dataset's metadata and checks it before any compute:
the dataset is prepared on first use when allowed (:func:`ensure_prepared`), the directory must
hold ArrayRecord files, ``label_key`` must be a class label, both splits must exist with every
shard present and non-empty, and ``augment`` must be known. Each problem is a one-line error
that names the fix. The result, a :class:`ResolvedDataset`, is all the iterators
(:mod:`qat_jax.data.iterators`) need; :func:`dataset_info` is its public summary.

TensorFlow Datasets is imported only here and in the readers, when a dataset is first opened.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys

from qat_jax.data import preparation, registry
from qat_jax.data.preprocess import AUGMENTATIONS, Preprocessor

log = logging.getLogger(__name__)

__all__ = [
    "DatasetInfo",
    "ReadOptions",
    "ResolvedDataset",
    "dataset_info",
    "ensure_prepared",
    "get_config_defaults",
    "open_builder",
    "resolve",
]


def get_config_defaults():
    """Default data config (an ``ml_collections.ConfigDict``).

    Fields:
      name: ``'fashion_mnist'`` | ``'cifar10'`` | ``'cifar100'`` | ``'imagenet2012'``.
      data_dir: TFDS data dir; None -> ``$QAT_JAX_DATA_DIR`` or ``~/tensorflow_datasets``.
      manual_dir: raw source files; None -> dataset default (Debian's
        ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST, else
        ``<data_dir>/downloads/manual``).
      image_size: side S of the square model input (28x28 images are zero-padded to 32x32).
        None keeps the native size (fixed-size datasets only).
      augment: ``'auto'`` (none for fashion_mnist, crop_flip for CIFAR, rrc_flip for ImageNet),
        ``'none'``, ``'crop_flip'`` or ``'rrc_flip'``.
      label_key: label feature; ``'coarse_label'`` selects the 20 CIFAR-100 superclasses.
      worker_count: grain worker processes (0 = in-process, with ``read_threads`` threads).
      auto_prepare: prepare fashion_mnist/cifar from ``manual_dir`` when missing from data_dir.
      train_split, eval_split: TFDS split names.
      num_train_examples, num_eval_examples: -1 = all, N > 0 = the first N of the split.
      read_threads: threads prefetching batches in-process (0 = synchronous).
      prefetch_batches: batches buffered ahead by the reading threads.
    """
    import ml_collections

    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        {
            "name": "fashion_mnist",
            "data_dir": placeholder(str),
            "manual_dir": placeholder(str),
            "image_size": 32,
            "augment": "auto",
            "label_key": "label",
            "worker_count": 0,
            "auto_prepare": True,
            "train_split": "train",
            "eval_split": "test",
            "num_train_examples": -1,
            "num_eval_examples": -1,
            "read_threads": 2,
            "prefetch_batches": 4,
        }
    )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model/trainer needs to know about the configured dataset.

    Attributes:
      name: dataset name.
      num_classes: number of classes of ``label_key``.
      image_shape: ``(H, W, C)`` of one preprocessed image (the batches' trailing dims).
      num_train: train examples used (after ``num_train_examples``).
      num_eval: eval examples used (after ``num_eval_examples``).
      label_key: the label feature used.
      label_names: class names (empty tuple if the dataset has none).
      builder_dir: the TFDS directory read.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int
    label_key: str = "label"
    label_names: tuple[str, ...] = ()
    builder_dir: str = ""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How batches are read: grain worker processes, or in-process threads and prefetch depth."""

    worker_count: int = 0
    read_threads: int = 2
    prefetch_batches: int = 4


@dataclasses.dataclass(frozen=True)
class ResolvedDataset:
    """A data config resolved against a prepared, checked TFDS directory.

    Attributes:
      name: dataset name.
      builder_dir: the TFDS directory read (``<data_dir>/<name>/<version>``).
      label_key: the label feature read.
      num_classes: number of classes of ``label_key``.
      label_names: class names (empty tuple if the dataset has none).
      train_split, eval_split: TFDS split names.
      num_train, num_eval: examples used of each split (the first ones, in file order).
      preprocessor: decoding, augmentation and normalisation of one image.
      read: how batches are read (:class:`ReadOptions`).
    """

    name: str
    builder_dir: str
    label_key: str
    num_classes: int
    label_names: tuple[str, ...]
    train_split: str
    eval_split: str
    num_train: int
    num_eval: int
    preprocessor: Preprocessor
    read: ReadOptions

    @property
    def info(self) -> DatasetInfo:
        """The public summary; ``image_shape`` is ``(image_size, image_size, C)``."""
        s = self.preprocessor.image_size
        return DatasetInfo(
            name=self.name,
            num_classes=self.num_classes,
            image_shape=(s, s, self.preprocessor.channels),
            num_train=self.num_train,
            num_eval=self.num_eval,
            label_key=self.label_key,
            label_names=self.label_names,
            builder_dir=self.builder_dir,
        )


def ensure_prepared(cfg) -> str:
    """Returns the TFDS builder dir of ``cfg.name``, preparing it first when allowed.

    With ``cfg.auto_prepare`` (default) a missing fashion_mnist/cifar10/cifar100 is built from
    ``cfg.manual_dir`` (Fashion-MNIST: Debian's files by default; a few seconds, once; safe to
    call from several processes at once).

    Raises:
      FileNotFoundError: not prepared (and not preparable); the message names the command.
    """
    spec = registry.get_spec(cfg.name)
    data_dir = registry.resolve_data_dir(cfg.get("data_dir"))
    found = registry.find_builder_dir(spec.name, data_dir)
    if found is not None:
        return found
    cmd = registry.prepare_command(spec.name, data_dir, cfg.get("manual_dir"))
    if not (cfg.get("auto_prepare", True) and spec.local_prepare):
        raise FileNotFoundError(f"{spec.name} is not prepared in {data_dir}; run: {cmd}")
    log.info("%s not found in %s; preparing it", spec.name, data_dir)
    try:
        return preparation.prepare(
            spec.name, cfg.get("manual_dir"), data_dir, progress=sys.stderr.isatty()
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{spec.name} is not prepared in {data_dir} and auto-prepare failed ({e}); run: {cmd}"
        ) from None


@functools.lru_cache(maxsize=16)
def open_builder(builder_dir: str):
    """The TFDS read-only builder of ``builder_dir`` (opened once per process)."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(builder_dir)


def _limit(split_size: int, limit: int, what: str) -> int:
    if limit is None or limit < 0:
        return split_size
    if limit == 0:
        raise ValueError(f"{what} must be -1 (all) or positive, got 0")
    return min(int(limit), split_size)


def _check_shards(name: str, bdir: str, split_infos) -> None:
    """A partial copy (a shard missing or empty) fails here, before any compute, not mid-run."""
    for split in split_infos:
        for path in map(str, split.filepaths):
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                cmd = registry.prepare_command(name, os.path.dirname(os.path.dirname(bdir)))
                raise FileNotFoundError(
                    f"{name} in {bdir} is incomplete: shard {os.path.basename(path)} of split "
                    f"{split.name!r} is missing or empty; copy the whole directory again, or "
                    f"delete {bdir} and re-prepare it: {cmd}"
                )


def resolve(cfg) -> ResolvedDataset:
    """Resolves a data config (:func:`get_config_defaults`): prepares, opens and checks it.

    Raises:
      FileNotFoundError: not prepared (and not preparable), not ArrayRecord, or a shard missing;
        the message names the command that fixes it.
      ValueError: unknown dataset, label key, split or augmentation, or an example limit of 0.
    """
    import tensorflow_datasets as tfds

    spec = registry.get_spec(cfg.name)
    bdir = ensure_prepared(cfg)
    info = open_builder(bdir).info
    file_format = str(getattr(info.file_format, "value", info.file_format))
    alternatives = [str(getattr(f, "value", f)) for f in info.alternative_file_formats]
    if file_format != "array_record" and "array_record" not in alternatives:
        raise FileNotFoundError(
            f"{bdir} holds {file_format} files, but ArrayRecord is needed; run: "
            f"tfds build {spec.name} --file_format=array_record (see docs/data.md)"
        )
    features = info.features
    label_key = cfg.get("label_key", "label")
    if label_key not in features.keys():
        raise ValueError(
            f"label_key {label_key!r} is not a feature of {spec.name}; "
            f"available: {sorted(features.keys())}"
        )
    label_feature = features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(f"feature {label_key!r} of {spec.name} is not a ClassLabel")
    splits = info.splits
    for key in ("train_split", "eval_split"):
        if cfg.get(key) not in splits:
            raise ValueError(f"{key}={cfg.get(key)!r} not in {spec.name} splits {list(splits)}")
    _check_shards(spec.name, bdir, [splits[cfg.train_split], splits[cfg.eval_split]])

    shape = tuple(features["image"].shape)
    image_size = cfg.get("image_size")
    if image_size is None:
        if shape[0] is None or shape[1] is None or shape[0] != shape[1]:
            raise ValueError(f"{spec.name} has image shape {shape}; set cfg.image_size")
        image_size = int(shape[0])
    augment = cfg.get("augment", "auto")
    if augment == "auto":
        augment = spec.default_augment
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be 'auto' or one of {AUGMENTATIONS}, got {augment!r}")
    pre = Preprocessor(
        image_size=int(image_size),
        channels=int(shape[-1]),
        augment=augment,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        eval_resize=spec.eval_resize or shape[0] is None,
        crop_frac=spec.crop_frac,
    )
    names = tuple(label_feature.names) if label_feature.names else ()
    if names and names == tuple(str(i) for i in range(len(names))):
        names = ()
    return ResolvedDataset(
        name=spec.name,
        builder_dir=bdir,
        label_key=label_key,
        num_classes=int(label_feature.num_classes),
        label_names=names,
        train_split=cfg.train_split,
        eval_split=cfg.eval_split,
        num_train=_limit(
            splits[cfg.train_split].num_examples,
            cfg.get("num_train_examples", -1),
            "num_train_examples",
        ),
        num_eval=_limit(
            splits[cfg.eval_split].num_examples, cfg.get("num_eval_examples", -1), "num_eval"
        ),
        preprocessor=pre,
        read=ReadOptions(
            worker_count=int(cfg.get("worker_count", 0)),
            read_threads=int(cfg.get("read_threads", 2)),
            prefetch_batches=int(cfg.get("prefetch_batches", 4)),
        ),
    )


def dataset_info(cfg) -> DatasetInfo:
    """Describes the configured dataset (prepares it first if needed and allowed).

    Returns:
      :class:`DatasetInfo`; ``image_shape`` is ``(image_size, image_size, C)``.
    """
    return resolve(cfg).info
