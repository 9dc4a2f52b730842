"""Example order, sharding over processes and devices, and one batch as numpy arrays.

Example order
-------------
All processes agree on one infinite *global stream* of example indices: epoch ``e`` is a
permutation of ``range(N)`` (grain's ``MapDataset.range(N).shuffle(seed)``, re-keyed per epoch),
and stream position ``g`` holds example ``perm_{g // N}[g % N]``. Global train batch ``k`` is
stream positions ``[k * B, (k + 1) * B)``; process ``p`` of ``P`` takes the contiguous slice
``[k * B + p * B / P, k * B + (p + 1) * B / P)``, split row-major into ``num_local_devices``
per-device batches (:class:`Layout`). Hence every example is seen exactly once per epoch across
processes (batches may straddle an epoch boundary; nothing is dropped), the union of the
processes' batches does not depend on the process count, and the iterator state is just the
step ``k``.

Augmentation draws are a pure function of ``(seed, epoch, example index)``
(:func:`qat_jax.data.preprocess.uniforms`), so batches do not depend on ``worker_count`` either.

Eval
----
Eval uses the split in file order, padded to ``ceil(N / B)`` full global batches; padded rows
have ``mask == 0`` (image zeros, label 0). Each process gets its slice of every global batch,
so all processes run the same number of eval steps and ``sum(mask)`` over all processes and
batches is exactly ``N``.

The batch functions are picklable (an opened reader is dropped and reopened), so grain worker
processes can run them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from qat_jax.data.preprocess import Preprocessor, decode_image, uniforms
from qat_jax.data.resolve import open_builder
from qat_jax.data.sources import DataPrepareError

__all__ = ["ArrayRecordSource", "EvalBatchFn", "Layout", "TrainBatchFn", "make_layout"]


class ArrayRecordSource:
    """Lazily opened TFDS ArrayRecord split returning (encoded image, label) pairs."""

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

            self._ds = open_builder(self.builder_dir).as_data_source(
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
class Layout:
    """Which rows of a global batch this process reads, and how they split over its devices."""

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


def make_layout(
    global_batch_size: int, num_local_devices: int, process_index=None, process_count=None
) -> Layout:
    """Checks the batch size against the processes and devices; None -> ``jax.process_*()``."""
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
    if global_batch_size < 1 or global_batch_size % div:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count * num_local_devices = {process_count} * {num_local_devices} = {div}"
        )
    return Layout(
        int(global_batch_size), int(process_index), int(process_count), int(num_local_devices)
    )


class TrainBatchFn:
    """step -> this process's train batch (numpy dict)."""

    def __init__(
        self, source: ArrayRecordSource, pre: Preprocessor, n: int, seed: int, layout: Layout
    ):
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


class EvalBatchFn:
    """k -> this process's k-th eval batch of the first ``n`` examples (numpy dict with 'mask')."""

    def __init__(self, source: ArrayRecordSource, pre: Preprocessor, n: int, layout: Layout):
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
