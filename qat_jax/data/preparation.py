"""Convert local source files into TFDS datasets (ArrayRecord) without TensorFlow.

The library behind :func:`qat_jax.data.prepare` (and :func:`is_prepared`); the command line
that calls it is ``python -m qat_jax.data`` (:mod:`qat_jax.data.__main__`).

The output is a regular TFDS data dir: ``<data_dir>/<name>/<version>/`` with
``dataset_info.json``, ``features.json``, label-name files and one ArrayRecord shard per split,
readable by ``tfds.data_source(name, data_dir=...)`` or ``tfds.builder_from_directory``. Names,
versions and features match the stock TFDS builders (images are PNG-encoded
``tfds.features.Image``; labels ``tfds.features.ClassLabel``; CIFAR also has the ``id`` text).

Everything is written into a hidden temporary directory next to the target and renamed into
place at the very end, so an interrupted run never leaves a directory that looks complete.
Running it again on a prepared dataset prints that it is already prepared and does nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterable

import numpy as np

from qat_jax.data import cifar_sources, registry, sources
from qat_jax.data.preprocess import PNG_SIGNATURE
from qat_jax.data.sources import DataPrepareError

__all__ = ["prepare", "is_prepared", "encode_png", "write_tfds_dataset", "DataPrepareError"]

log = logging.getLogger(__name__)


def is_prepared(name: str, data_dir: str | None = None) -> bool:
    """Whether a complete prepared copy of ``name`` exists in ``data_dir``."""
    return registry.find_builder_dir(name, registry.resolve_data_dir(data_dir)) is not None


def prepare(
    name: str,
    manual_dir: str | None = None,
    data_dir: str | None = None,
    *,
    progress: bool = True,
    force: bool = False,
) -> str:
    """Prepares dataset ``name`` from the raw files in ``manual_dir`` into ``data_dir``.

    Idempotent: when ``<data_dir>/<name>/<version>/dataset_info.json`` already exists nothing is
    read or written (unless ``force``). Source files are fully read and validated (counts,
    shapes, label ranges) before anything is written.

    Args:
      name: ``'fashion_mnist'``, ``'cifar10'`` or ``'cifar100'``. ``'imagenet2012'`` cannot be
        built here (it needs the TFDS ImageNet builder, i.e. TensorFlow): if a prepared copy is
        present this returns its path, otherwise it raises FileNotFoundError with instructions.
      manual_dir: directory with the source files; None -> the dataset default (Debian's
        ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST, ``<data_dir>/downloads/manual``
        otherwise).
      data_dir: TFDS data dir; None -> ``$QAT_JAX_DATA_DIR`` or ``~/tensorflow_datasets``.
      progress: show a tqdm progress bar while encoding.
      force: rebuild even if a prepared copy exists (the old one is replaced atomically-ish:
        the new copy is complete before the old one is removed).

    Returns:
      The builder directory ``<data_dir>/<name>/<version>``.

    Raises:
      FileNotFoundError: a source file is missing (message names the file and the fix).
      DataPrepareError: (a ValueError) a source file is truncated, corrupt or of the wrong kind.
    """
    spec = registry.get_spec(name)
    data_dir = registry.resolve_data_dir(data_dir)
    existing = registry.find_builder_dir(name, data_dir)
    if existing is not None and not force:
        log.info("%s is already prepared at %s", name, existing)
        return existing
    if not spec.local_prepare:
        raise FileNotFoundError(
            f"{name} is not prepared in {data_dir} and cannot be built without TensorFlow; run "
            f"{registry.prepare_command(name, data_dir)} and copy <data_dir>/{name} over"
        )
    manual_dir = registry.resolve_manual_dir(name, manual_dir, data_dir)

    if name == "fashion_mnist":
        splits = sources.read_fashion_mnist(manual_dir)
        label_names = {"label": list(sources.FASHION_MNIST_LABEL_NAMES)}
    else:
        splits, label_names = cifar_sources.read_cifar(name, manual_dir)
    for split, arr in splits.items():
        log.info("%s/%s: %d examples, images %s", name, split, len(arr), arr.images.shape[1:])

    features = _features(name, label_names)
    target = os.path.join(data_dir, name, spec.version)
    has_id = "id" in features.keys()

    def examples(split: str, arr: sources.SplitArrays):
        for i in range(len(arr)):
            ex = {"image": encode_png(arr.images[i])}
            for key, lab in arr.labels.items():
                ex[key] = int(lab[i])
            if has_id:
                ex["id"] = f"{split}_{i:05d}"
            yield ex

    write_tfds_dataset(
        name,
        spec.version,
        features,
        {split: (len(arr), examples(split, arr)) for split, arr in splits.items()},
        target,
        description=_DESCRIPTIONS.get(name, name),
        progress=progress,
    )
    return target


def _features(name: str, label_names: dict):
    import tensorflow_datasets as tfds

    def class_label(key: str, n: int):
        names = label_names.get(key)
        if names:
            return tfds.features.ClassLabel(names=list(names))
        return tfds.features.ClassLabel(num_classes=n)

    if name == "fashion_mnist":
        return tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": class_label("label", 10),
            }
        )
    feats = {
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": class_label("label", 10 if name == "cifar10" else 100),
    }
    if name == "cifar100":
        feats["coarse_label"] = class_label("coarse_label", 20)
    return tfds.features.FeaturesDict(feats)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + tag
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)) & 0xFFFFFFFF)
    )


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 ``[H, W, 1]`` (grey) or ``[H, W, 3]`` (RGB) image as a PNG file.

    A minimal, standard PNG (8-bit, no interlace, filter type 0 per row) written with zlib;
    several times faster than going through PIL for tiny images and decodable by any PNG
    reader (PIL, OpenCV, ``tf.io.decode_png``).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
    h, w, c = image.shape
    rows = np.empty((h, 1 + w * c), np.uint8)
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = image.reshape(h, w * c)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


_DESCRIPTIONS = {
    "fashion_mnist": "Fashion-MNIST (Zalando), prepared by qat_jax.data from IDX files.",
    "cifar10": "CIFAR-10 (Krizhevsky, 2009), prepared by qat_jax.data.",
    "cifar100": "CIFAR-100 (Krizhevsky, 2009), prepared by qat_jax.data.",
}


def write_tfds_dataset(
    name: str,
    version: str,
    features,
    splits: dict[str, tuple[int, Iterable[dict]]],
    target: str,
    *,
    description: str = "",
    progress: bool = False,
) -> None:
    """Writes a TFDS ArrayRecord dataset dir without TensorFlow.

    Everything goes into a hidden temp dir next to ``target`` that is renamed to ``target``
    once ``dataset_info.json`` is written; on any error the temp dir is removed.

    Args:
      name, version: TFDS dataset name and version.
      features: ``tfds.features.FeaturesDict``; images must already be encoded bytes.
      splits: split name -> (number of examples, iterable of example dicts).
      target: final builder dir, normally ``<data_dir>/<name>/<version>``.
      description: stored in dataset_info.json.
      progress: tqdm progress bar.
    """
    import tensorflow_datasets as tfds
    from array_record.python import array_record_module
    from tqdm import tqdm

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".incomplete-{version}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        split_infos = []
        total = sum(count for count, _ in splits.values())
        bar = tqdm(
            total=total, desc=f"prepare {name}", unit="img", disable=not progress, leave=True
        )
        for split, (count, examples) in splits.items():
            fname = f"{name}-{split}.array_record-00000-of-00001"
            path = os.path.join(tmp, fname)
            writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
            written = 0
            for ex in examples:
                writer.write(features.serialize_example(ex))
                written += 1
                if written % 1000 == 0:
                    bar.update(1000)
            bar.update(written % 1000)
            if written != count:
                writer.close()
                raise DataPrepareError(f"{name}/{split}: expected {count} examples, got {written}")
            writer.close()
            split_infos.append(
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[count],
                    num_bytes=os.path.getsize(path),
                    filename_template=tfds.core.ShardedFileTemplate(
                        data_dir=tmp,
                        dataset_name=name,
                        split=split,
                        filetype_suffix="array_record",
                    ),
                )
            )
        bar.close()
        identity = tfds.core.dataset_info.DatasetIdentity(
            name=name,
            version=tfds.core.Version(version),
            data_dir=tmp,
            module_name="qat_jax.data.preparation",
        )
        info = tfds.core.DatasetInfo(
            builder=identity,
            description=description or name,
            features=features,
            supervised_keys=("image", "label"),
        )
        info.set_file_format("array_record")
        info.set_splits(tfds.core.SplitDict(split_infos))
        info.write_to_directory(tmp)  # dataset_info.json marks completeness
        if os.path.isdir(target):
            # Only reached with force=True or after a concurrent preparer won the race.
            old = os.path.join(parent, f".old-{version}-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if registry.find_builder_dir(name, os.path.dirname(parent)) is None:
                raise
            # Another process finished first; its copy is equivalent.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
