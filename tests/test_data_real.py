"""Reads the real Fashion-MNIST from Debian's dataset-fashion-mnist package (skipped if absent)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from qat_jax import data

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.isfile(os.path.join(DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz")),
        reason="Debian package dataset-fashion-mnist is not installed",
    ),
]


@pytest.fixture(scope="session")
def real_cfg(tmp_path_factory):
    """Default config with the real Fashion-MNIST auto-prepared into a pytest tmp data_dir."""
    cfg = data.get_config_defaults()
    cfg.data_dir = str(tmp_path_factory.mktemp("real_tfds"))
    data.ensure_prepared(cfg)  # the trainer's first-use path (a few seconds)
    return cfg


def _idx(name: str) -> np.ndarray:
    with gzip.open(os.path.join(DEBIAN_DIR, name)) as f:
        raw = f.read()
    offset = 16 if "images" in name else 8
    return np.frombuffer(raw, np.uint8, offset=offset)


def test_real_split_sizes_and_class_balance(real_cfg):
    import tensorflow_datasets as tfds

    info = data.dataset_info(real_cfg)
    assert (info.name, info.num_classes, info.image_shape) == ("fashion_mnist", 10, (32, 32, 1))
    assert (info.num_train, info.num_eval) == (60000, 10000)
    builder = tfds.builder_from_directory(info.builder_dir)
    for split, per_class in (("train", 6000), ("test", 1000)):
        src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        labels = np.asarray([ex["label"] for ex in src.__getitems__(range(len(src)))])
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    # Images are stored losslessly.
    test_images = _idx("t10k-images-idx3-ubyte.gz").reshape(-1, 28, 28)
    src = builder.as_data_source("test")
    for i in (0, 4321, 9999):
        np.testing.assert_array_equal(src[i]["image"][..., 0], test_images[i])


def test_real_pipeline_batches(real_cfg):
    it = data.make_train_iterator(
        real_cfg, 128, seed=0, num_local_devices=1, process_index=0, process_count=1
    )
    b = next(it)
    assert b["image"].shape == (1, 128, 32, 32, 1) and b["label"].shape == (1, 128)
    assert abs(float(b["image"].mean())) < 0.5  # roughly normalised
    cfg = real_cfg.copy_and_resolve_references()
    cfg.num_eval_examples = 1000
    ev = data.make_eval_batches(cfg, 384, num_local_devices=1, process_index=0, process_count=1)
    assert len(ev) == 3 and sum(float(x["mask"].sum()) for x in ev) == 1000
