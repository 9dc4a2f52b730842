"""Train and eval iterators over a resolved dataset, driven by grain.

* :func:`make_train_iterator` -> :class:`TrainIterator`: infinite, checkpointable
  (``get_state`` / ``set_state``) train batches of this process.
* :func:`make_eval_batches` -> :class:`EvalBatches`: re-iterable, padded and masked eval batches.
* :class:`EvalCache`: the eval batches a training run asks for at every evaluation, resolved
  once and reused.

Which examples land in which batch, process and device is decided in :mod:`qat_jax.data.batches`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np

from qat_jax.data.batches import ArrayRecordSource, EvalBatchFn, TrainBatchFn, make_layout
from qat_jax.data.resolve import ReadOptions, ResolvedDataset, resolve

__all__ = [
    "EvalBatches",
    "EvalCache",
    "TrainIterator",
    "make_eval_batches",
    "make_train_iterator",
]

_STATE_FORMAT = "qat_jax.data.train_iterator/1"
_INFINITE = 2**62


def _grain_iter(fn, start: int, stop: int, read: ReadOptions):
    import grain

    ds = grain.MapDataset.range(start, stop).map(fn)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read.read_threads, prefetch_buffer_size=read.prefetch_batches)
    )
    if read.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain's multiprocessing reads absl flags; outside absl.app use their defaults.
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=read.worker_count))
    return iter(it_ds)


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

    def __init__(self, fn: TrainBatchFn, meta: dict, read: ReadOptions):
        self._fn = fn
        self._meta = meta
        self._read = read
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
            self._it = _grain_iter(self._fn, self._step, _INFINITE, self._read)
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
    resolved: ResolvedDataset | None = None,
) -> TrainIterator:
    """Builds the infinite train iterator for this process.

    Args:
      cfg: data config (:func:`qat_jax.data.get_config_defaults`).
      global_batch_size: batch size summed over all processes and devices; must be divisible by
        ``process_count * num_local_devices``.
      seed: shuffling/augmentation seed (from the experiment config).
      num_local_devices: leading axis of the batches (``jax.local_device_count()`` for pmap).
      process_index, process_count: None -> ``jax.process_index()`` / ``jax.process_count()``.
      resolved: ``resolve(cfg)`` when the caller has it already (not resolved again).

    Returns:
      :class:`TrainIterator` yielding ``{'image': float32 [D, b, S, S, C], 'label': int32
      [D, b]}`` with ``D = num_local_devices`` and ``b = global_batch_size // (process_count *
      D)``.

    Raises:
      ValueError: bad batch size / process arguments / config.
      FileNotFoundError: dataset not prepared (message names the command to run).
    """
    layout = make_layout(global_batch_size, num_local_devices, process_index, process_count)
    r = resolve(cfg) if resolved is None else resolved
    source = ArrayRecordSource(r.builder_dir, r.train_split, r.label_key)
    fn = TrainBatchFn(source, r.preprocessor, r.num_train, seed, layout)
    meta = {
        "dataset": r.name,
        "split": r.train_split,
        "num_examples": r.num_train,
        "global_batch_size": int(global_batch_size),
        "seed": int(seed),
    }
    return TrainIterator(fn, meta, r.read)


class EvalBatches:
    """Re-iterable eval batches of one process (``len()`` = number of batches).

    Each batch: ``{'image': float32 [D, b, S, S, C], 'label': int32 [D, b], 'mask': float32
    [D, b]}``; ``mask`` is 1 for real examples and 0 for padding. All processes yield the same
    number of batches; the masks sum to ``num_examples`` over all processes.
    """

    def __init__(self, fn: EvalBatchFn, read: ReadOptions):
        self._fn = fn
        self._read = read
        self.num_examples = int(fn.n)
        self.num_batches = math.ceil(self.num_examples / fn.layout.global_batch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        it = _grain_iter(self._fn, 0, self.num_batches, self._read)
        try:
            yield from it
        finally:
            if hasattr(it, "close"):
                it.close()

    def first(self, num_examples: int) -> EvalBatches:
        """The batches of the first ``num_examples`` examples (-1: all), from the same reader.

        Equal to :func:`make_eval_batches` with ``num_eval_examples = min(num_examples,
        self.num_examples)``, without resolving the dataset again.
        """
        if num_examples == 0:
            raise ValueError("num_eval_examples must be -1 (all) or positive, got 0")
        if num_examples < 0 or num_examples >= self.num_examples:
            return self
        f = self._fn
        return EvalBatches(EvalBatchFn(f.source, f.pre, int(num_examples), f.layout), self._read)


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
      cfg: data config (:func:`qat_jax.data.get_config_defaults`).
      global_batch_size: must be divisible by ``process_count * num_local_devices``.
      num_local_devices, process_index, process_count: as in :func:`make_train_iterator`.

    Returns:
      :class:`EvalBatches`: ``ceil(num_eval / global_batch_size)`` batches of
      ``{'image': float32 [D, b, S, S, C], 'label': int32 [D, b], 'mask': float32 [D, b]}``.
    """
    layout = make_layout(global_batch_size, num_local_devices, process_index, process_count)
    r = resolve(cfg)
    source = ArrayRecordSource(r.builder_dir, r.eval_split, r.label_key)
    return EvalBatches(EvalBatchFn(source, r.preprocessor, r.num_eval, layout), r.read)


class EvalCache:
    """The eval batches of one run, resolved once and reused at every evaluation.

    ``get`` takes the arguments of :func:`make_eval_batches` and returns the same batches. The
    first call for a config resolves the dataset (preparation check, metadata, shard check) and
    opens its reader; later calls, and calls whose config differs only in
    ``num_eval_examples`` (the per-stage evaluation on fewer examples), reuse them.
    """

    def __init__(self):
        self._whole: dict[tuple, EvalBatches] = {}

    @property
    def num_resolved(self) -> int:
        """How many times a dataset was resolved (one per distinct config and layout)."""
        return len(self._whole)

    def get(
        self,
        cfg,
        global_batch_size: int,
        *,
        num_local_devices: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> EvalBatches:
        """:func:`make_eval_batches` ``(cfg, global_batch_size, ...)``, cached."""
        import ml_collections

        whole = ml_collections.ConfigDict(cfg.to_dict())
        limit = int(whole.get("num_eval_examples", -1))
        whole.num_eval_examples = -1
        key = (
            json.dumps(whole.to_dict(), sort_keys=True, default=repr),
            int(global_batch_size),
            int(num_local_devices),
            process_index,
            process_count,
        )
        if key not in self._whole:
            self._whole[key] = make_eval_batches(
                whole,
                global_batch_size,
                num_local_devices=num_local_devices,
                process_index=process_index,
                process_count=process_count,
            )
        return self._whole[key].first(limit)
