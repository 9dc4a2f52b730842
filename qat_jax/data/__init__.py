"""Data input for qat_jax: TFDS ArrayRecord datasets (no TensorFlow) + grain pipelines.

Public API (stable; used by the trainer):

* :func:`get_config_defaults` -> ``ml_collections.ConfigDict`` (fields documented there).
* :func:`dataset_info` (cfg) -> :class:`DatasetInfo` (name, num_classes, image_shape,
  num_train, num_eval).
* :func:`make_train_iterator` (cfg, global_batch_size, *, seed, num_local_devices,
  process_index=None, process_count=None, resolved=None) -> :class:`TrainIterator`, an infinite
  iterator of ``{'image': float32 [D, b, H, W, C], 'label': int32 [D, b]}`` with
  ``get_state()`` / ``set_state()`` for exact resumption (``resolved``: the dataset already
  resolved by :func:`qat_jax.data.resolve.resolve`, not resolved again).
* :func:`make_eval_batches` (cfg, global_batch_size, *, num_local_devices, process_index=None,
  process_count=None) -> :class:`EvalBatches`, re-iterable, batches with an extra float32
  ``'mask'`` [D, b] (1 = real example, 0 = padding); :class:`EvalCache` hands out the same
  batches, resolved once per run.
* :func:`prepare` (name, manual_dir, data_dir) converts local source files into a TFDS data dir
  (also ``python -m qat_jax.data``); :func:`ensure_prepared` (cfg) does it on first use.

Modules, in the order data flows: ``registry`` (per-dataset constants, where prepared data
lives) -> ``sources`` (readers of the raw files) -> ``preparation`` (raw files -> TFDS
ArrayRecord dir; its CLI is ``__main__``) -> ``resolve`` (config -> a checked
:class:`~qat_jax.data.resolve.ResolvedDataset`) -> ``batches`` (example order, sharding over
processes and devices, one numpy batch; decoding and augmentation come from ``preprocess``) ->
``iterators`` (grain-driven train iterator and eval batches).

Importing this package loads neither TensorFlow Datasets nor grain: they are imported when a
dataset is first opened.

Datasets: ``fashion_mnist`` (default; prepared automatically from Debian's
``dataset-fashion-mnist`` files), ``cifar10``, ``cifar100`` (``label_key='coarse_label'`` for the
20 superclasses), ``imagenet2012`` (an existing TFDS ArrayRecord build). See docs/data.md.
"""

from qat_jax.data.iterators import (
    EvalBatches,
    EvalCache,
    TrainIterator,
    make_eval_batches,
    make_train_iterator,
)
from qat_jax.data.preparation import is_prepared, prepare
from qat_jax.data.resolve import DatasetInfo, dataset_info, ensure_prepared, get_config_defaults
from qat_jax.data.sources import DataPrepareError

__all__ = [
    "DataPrepareError",
    "DatasetInfo",
    "EvalBatches",
    "EvalCache",
    "TrainIterator",
    "dataset_info",
    "ensure_prepared",
    "get_config_defaults",
    "is_prepared",
    "make_eval_batches",
    "make_train_iterator",
    "prepare",
]
