"""Train/eval input pipelines over TFDS ArrayRecord data sources, built on grain.

Example order
-------------
All processes agree on one infinite *global stream* of example indices: epoch ``e`` is a
permutation of ``range(N)`` (grain's ``MapDataset.range(N).shuffle(seed)``, re-keyed per epoch),
and stream position ``g`` holds example ``perm_{g // N}[g % N]``. Global train batch ``k`` is
stream positions ``[k * B, (k + 1) * B)``; process ``p`` of ``P`` takes the contiguous slice
``[k * B + p * B / P, k * B + (p + 1) * B / P)``, split row-major into ``num_local_devices``
per-device batches. Hence every example is seen exactly once per epoch across processes (batches
may straddle an epoch boundary; nothing is dropped), the union of the processes' batches does
not depend on the process count, and the iterator state is just the step ``k``.

Augmentation draws are a pure function of ``(seed, epoch, example index)``
(:func:`qat_jax.data.preprocess.uniforms`), so batches do not depend on ``worker_count`` either.

Eval
----
Eval uses the split in file order, padded to ``ceil(N / B)`` full global batches; padded rows
have ``mask == 0`` (image zeros, label 0). Each process gets its slice of every global batch,
so all processes run the same number of eval steps and ``sum(mask)`` over all processes and
batches is exactly ``N``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from qat_jax.data import registry
from qat_jax.data.preprocess import AUGMENTATIONS, Preprocessor, decode_image, uniforms
from qat_jax.data.sources import DataPrepareError

log = logging.getLogger(__name__)

__all__ = [
    "DatasetInfo",
    "EvalBatches",
    "TrainIterator",
    "dataset_info",
    "ensure_prepared",
    "get_config_defaults",
    "make_eval_batches",
    "make_train_iterator",
]

_STATE_FORMAT = "qat_jax.data.train_iterator/1"
_INFINITE = 2**62


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


# --------------------------------------------------------------------------------------
# Resolution of a config into a concrete, prepared dataset
# --------------------------------------------------------------------------------------


def ensure_prepared(cfg) -> str:
    """Returns the TFDS builder dir of ``cfg.name``, preparing it first when allowed.

    With ``cfg.auto_prepare`` (default) a missing fashion_mnist/cifar10/cifar100 is built from
    ``cfg.manual_dir`` (Fashion-MNIST: Debian's files by default; a few seconds, once; safe to
    call from several processes at once).

    Raises:
      FileNotFoundError: not prepared (and not preparable); the message names the command.
    """
    from qat_jax.data import preparation as prepare_lib

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
        return prepare_lib.prepare(
            spec.name, cfg.get("manual_dir"), data_dir, progress=sys.stderr.isatty()
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{spec.name} is not prepared in {data_dir} and auto-prepare failed ({e}); run: {cmd}"
        ) from None


@functools.lru_cache(maxsize=16)
def _builder(builder_dir: str):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(builder_dir)


@dataclasses.dataclass(frozen=True)
class _Resolved:
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


def _resolve(cfg) -> _Resolved:
    import tensorflow_datasets as tfds

    spec = registry.get_spec(cfg.name)
    bdir = ensure_prepared(cfg)
    builder = _builder(bdir)
    info = builder.info
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

    image_feature = features["image"]
    shape = tuple(image_feature.shape)
    channels = int(shape[-1])
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
        channels=channels,
        augment=augment,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        eval_resize=spec.eval_resize or shape[0] is None,
        crop_frac=spec.crop_frac,
    )
    names = tuple(label_feature.names) if label_feature.names else ()
    if names and names == tuple(str(i) for i in range(len(names))):
        names = ()
    return _Resolved(
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
    )


def dataset_info(cfg) -> DatasetInfo:
    """Describes the configured dataset (prepares it first if needed and allowed).

    Returns:
      :class:`DatasetInfo`; ``image_shape`` is ``(image_size, image_size, C)``.
    """
    r = _resolve(cfg)
    s = r.preprocessor.image_size
    return DatasetInfo(
        name=r.name,
        num_classes=r.num_classes,
        image_shape=(s, s, r.preprocessor.channels),
        num_train=r.num_train,
        num_eval=r.num_eval,
        label_key=r.label_key,
        label_names=r.label_names,
        builder_dir=r.builder_dir,
    )


# --------------------------------------------------------------------------------------
# Batch construction (picklable callables, so they also work in grain worker processes)
# --------------------------------------------------------------------------------------


class _Source:
    """Lazily opened TFDS ArrayRecord data source returning (encoded image, label) pairs."""

    def __init__(self, builder_dir: str, split: str, label_key: str):
        self.builder_dir = builder_dir
        self.split = split
        self.label_key = label_key
        self._ds = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None
        return state

    def _open(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            self._ds = _builder(self.builder_dir).as_data_source(
                self.split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        return self._ds

    def read(self, indices: np.ndarray) -> tuple[list[Any], np.ndarray]:
        """Returns (encoded images, int32 labels) of the given example indices, in order."""
        try:
            ds = self._open()
            records = ds.__getitems__([int(i) for i in indices])
        except RuntimeError as e:  # array_record: a truncated or corrupt shard
            raise DataPrepareError(
                f"cannot read split {self.split!r} of {self.builder_dir} "
                f"({str(e).splitlines()[0]}): its files are truncated or corrupt; copy the "
                "directory again, or delete it and re-prepare the dataset (docs/data.md)"
            ) from None
        if len(records) != len(indices):
            raise IndexError(f"asked {len(indices)} records from {self.builder_dir}, got fewer")
        images = [r["image"] for r in records]
        labels = np.asarray([r[self.label_key] for r in records], np.int32)
        return images, labels


def _shuffle_seed(seed: int) -> int:
    # Spread user seeds over 2**32 so that (seed, epoch + 1) and (seed + 1, epoch) differ
    # (grain keys epoch e of a shuffle with seed + e).
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x51A7]).generate_state(1)[0])


@dataclasses.dataclass
class _Layout:
    global_batch: int
    process_index: int
    process_count: int
    num_local_devices: int

    @property
    def per_process(self) -> int:
        return self.global_batch // self.process_count

    @property
    def per_device(self) -> int:
        return self.per_process // self.num_local_devices

    def positions(self, step: int) -> np.ndarray:
        """Global positions of this process's rows of global batch ``step``."""
        start = step * self.global_batch + self.process_index * self.per_process
        return np.arange(start, start + self.per_process, dtype=np.int64)

    def to_devices(self, x: np.ndarray) -> np.ndarray:
        return x.reshape((self.num_local_devices, self.per_device) + x.shape[1:])


class _TrainBatchFn:
    """step -> this process's train batch (numpy dict)."""

    def __init__(self, source: _Source, pre: Preprocessor, n: int, seed: int, layout: _Layout):
        self.source = source
        self.pre = pre
        self.n = n
        self.seed = int(seed)
        self.layout = layout
        self._order = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_order"] = None
        return state

    def example_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, example index) of this process's rows of batch ``step``."""
        if self._order is None:
            import grain

            self._order = grain.MapDataset.range(self.n).shuffle(seed=_shuffle_seed(self.seed))
        g = self.layout.positions(step)
        order = self._order
        idx = np.fromiter((order[int(i)] for i in g), dtype=np.int64, count=len(g))
        return g // self.n, idx

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, idx = self.example_indices(int(step))
        encoded, labels = self.source.read(idx)
        draws = uniforms(self.seed, epoch, idx, self.pre.num_draws)
        c = self.pre.channels
        images = np.stack(
            [self.pre.train(decode_image(e, c), draws[i]) for i, e in enumerate(encoded)]
        )
        lay = self.layout
        return {
            "image": lay.to_devices(self.pre.normalize(images)),
            "label": lay.to_devices(labels),
        }


class _EvalBatchFn:
    """k -> this process's k-th eval batch (numpy dict with 'mask')."""

    def __init__(self, source: _Source, pre: Preprocessor, n: int, layout: _Layout):
        self.source = source
        self.pre = pre
        self.n = n
        self.layout = layout

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        g = self.layout.positions(int(k))
        real = g < self.n
        s, c = self.pre.image_size, self.pre.channels
        images = np.zeros((len(g), s, s, c), np.float32)
        labels = np.zeros((len(g),), np.int32)
        if real.any():
            encoded, lab = self.source.read(g[real])
            imgs = np.stack([self.pre.base(decode_image(e, c)) for e in encoded])
            images[real] = self.pre.normalize(imgs)
            labels[real] = lab
        lay = self.layout
        return {
            "image": lay.to_devices(images),
            "label": lay.to_devices(labels),
            "mask": lay.to_devices(real.astype(np.float32)),
        }


def _grain_iter(fn, start: int, stop: int, worker_count: int, read_threads: int, prefetch: int):
    import grain

    ds = grain.MapDataset.range(start, stop).map(fn)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain's multiprocessing reads absl flags; outside absl.app use their defaults.
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def _layout(cfg_batch: int, num_local_devices: int, process_index, process_count) -> _Layout:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if num_local_devices < 1 or process_count < 1:
        raise ValueError(
            f"num_local_devices ({num_local_devices}) and process_count ({process_count}) "
            "must be >= 1"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    div = process_count * num_local_devices
    if cfg_batch < 1 or cfg_batch % div:
        raise ValueError(
            f"global_batch_size {cfg_batch} must be a positive multiple of "
            f"process_count * num_local_devices = {process_count} * {num_local_devices} = {div}"
        )
    return _Layout(int(cfg_batch), int(process_index), int(process_count), int(num_local_devices))


# --------------------------------------------------------------------------------------
# Public iterators
# --------------------------------------------------------------------------------------


class TrainIterator(Iterator):
    """Infinite, checkpointable iterator of train batches.

    Each ``next()`` returns ``{'image': float32 [num_local_devices, per_device_batch, S, S, C],
    'label': int32 [num_local_devices, per_device_batch]}`` where
    ``per_device_batch = global_batch_size // (process_count * num_local_devices)``.

    ``get_state()`` returns a small JSON-serialisable dict; ``set_state(state)`` makes the next
    batch exactly the one an uninterrupted iterator would have produced after the batches
    counted in ``state``. The state refers to the *global* step, so it may be restored with a
    different process count, device count or ``worker_count``; seed, global batch size,
    dataset and number of examples must match (ValueError otherwise).
    """

    def __init__(self, fn: _TrainBatchFn, meta: dict, worker_count: int, threads: int, prefetch):
        self._fn = fn
        self._meta = meta
        self._worker_count = int(worker_count)
        self._threads = int(threads)
        self._prefetch = int(prefetch)
        self._step = 0
        self._it = None

    @property
    def step(self) -> int:
        """Number of batches produced so far (the global step of the next batch)."""
        return self._step

    @property
    def steps_per_epoch(self) -> float:
        """Examples per epoch / global batch size (may be fractional)."""
        return self._meta["num_examples"] / self._meta["global_batch_size"]

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self._step / self.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = _grain_iter(
                self._fn, self._step, _INFINITE, self._worker_count, self._threads, self._prefetch
            )
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable state: ``{'step', 'seed', 'global_batch_size', ...}``."""
        return {"format": _STATE_FORMAT, "step": self._step, **self._meta}

    def set_state(self, state: dict) -> None:
        """Restores a state from :meth:`get_state` (see the class docstring)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a train iterator state (format={state.get('format')!r})")
        for key, value in self._meta.items():
            if state.get(key) != value:
                raise ValueError(
                    f"train iterator state mismatch: {key}={state.get(key)!r} in the state but "
                    f"{value!r} in this iterator"
                )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"invalid step {step} in state")
        self.close()
        self._step = step

    def close(self) -> None:
        """Stops prefetching threads/processes (a later ``next()`` restarts them)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter shutdown
            pass


def make_train_iterator(
    cfg,
    global_batch_size: int,
    *,
    seed: int,
    num_local_devices: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Builds the infinite train iterator for this process.

    Args:
      cfg: data config (:func:`get_config_defaults`).
      global_batch_size: batch size summed over all processes and devices; must be divisible by
        ``process_count * num_local_devices``.
      seed: shuffling/augmentation seed (from the experiment config).
      num_local_devices: leading axis of the batches (``jax.local_device_count()`` for pmap).
      process_index, process_count: None -> ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
      :class:`TrainIterator` yielding ``{'image': float32 [D, b, S, S, C], 'label': int32
      [D, b]}`` with ``D = num_local_devices`` and ``b = global_batch_size // (process_count *
      D)``.

    Raises:
      ValueError: bad batch size / process arguments / config.
      FileNotFoundError: dataset not prepared (message names the command to run).
    """
    layout = _layout(global_batch_size, num_local_devices, process_index, process_count)
    r = _resolve(cfg)
    source = _Source(r.builder_dir, r.train_split, r.label_key)
    fn = _TrainBatchFn(source, r.preprocessor, r.num_train, seed, layout)
    meta = {
        "dataset": r.name,
        "split": r.train_split,
        "num_examples": r.num_train,
        "global_batch_size": int(global_batch_size),
        "seed": int(seed),
    }
    return TrainIterator(
        fn,
        meta,
        worker_count=cfg.get("worker_count", 0),
        threads=cfg.get("read_threads", 2),
        prefetch=cfg.get("prefetch_batches", 4),
    )


class EvalBatches:
    """Re-iterable eval batches of one process (``len()`` = number of batches).

    Each batch: ``{'image': float32 [D, b, S, S, C], 'label': int32 [D, b], 'mask': float32
    [D, b]}``; ``mask`` is 1 for real examples and 0 for padding. All processes yield the same
    number of batches; the masks sum to ``num_examples`` over all processes.
    """

    def __init__(self, fn: _EvalBatchFn, num_batches: int, num_examples: int, cfg_threads: tuple):
        self._fn = fn
        self.num_batches = int(num_batches)
        self.num_examples = int(num_examples)
        self._threads = cfg_threads

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        worker_count, threads, prefetch = self._threads
        it = _grain_iter(self._fn, 0, self.num_batches, worker_count, threads, prefetch)
        try:
            yield from it
        finally:
            if hasattr(it, "close"):
                it.close()


def make_eval_batches(
    cfg,
    global_batch_size: int,
    *,
    num_local_devices: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalBatches:
    """Builds the eval batches of this process (all of ``cfg.eval_split``, padded + masked).

    Args:
      cfg: data config (:func:`get_config_defaults`).
      global_batch_size: must be divisible by ``process_count * num_local_devices``.
      num_local_devices, process_index, process_count: as in :func:`make_train_iterator`.

    Returns:
      :class:`EvalBatches`: ``ceil(num_eval / global_batch_size)`` batches of
      ``{'image': float32 [D, b, S, S, C], 'label': int32 [D, b], 'mask': float32 [D, b]}``.
    """
    layout = _layout(global_batch_size, num_local_devices, process_index, process_count)
    r = _resolve(cfg)
    source = _Source(r.builder_dir, r.eval_split, r.label_key)
    fn = _EvalBatchFn(source, r.preprocessor, r.num_eval, layout)
    num_batches = math.ceil(r.num_eval / global_batch_size)
    threads = (
        cfg.get("worker_count", 0),
        cfg.get("read_threads", 2),
        cfg.get("prefetch_batches", 4),
    )
    return EvalBatches(fn, num_batches, r.num_eval, threads)
