"""Tests of qat_jax.data on tiny source files written in the real layouts (no network)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from absl import flags

from qat_jax import data
from qat_jax.data import __main__ as data_cli
from qat_jax.data import preparation as prepare_lib
from qat_jax.data import registry
from qat_jax.data.preprocess import Preprocessor, decode_image, uniforms

N_TRAIN, N_TEST = 40, 13


def prepare_main(args: list[str]) -> int:
    """``python -m qat_jax.data ARGS`` in this process: absl's parse, then its main; the exit code
    (a bad flag exits with :class:`SystemExit`, as ``app.run`` would)."""
    flags.FLAGS.unparse_flags()  # no value left over from an earlier call
    return data_cli.main(data_cli.parse_flags(["qat_jax.data", *args]))


# --------------------------------------------------------------------------------------
# Tiny source files
# --------------------------------------------------------------------------------------


def _tagged_images(n: int, h: int, w: int, c: int, offset: int = 0) -> np.ndarray:
    """Random images whose pixel (0, 0, 0) holds the example index (+ offset)."""
    rng = np.random.default_rng(n * 1000 + offset)
    x = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) + offset
    return x


def _write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def write_fashion_mnist(root) -> dict:
    os.makedirs(root, exist_ok=True)
    out = {}
    for prefix, n, off in (("train", N_TRAIN, 0), ("t10k", N_TEST, 100)):
        imgs = _tagged_images(n, 28, 28, 1, off)[..., 0]
        labels = (np.arange(n) * 7) % 10
        _write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), imgs)
        _write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        out[prefix] = (imgs, labels)
    return out


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_cifar(root, name: str, kind: str = "py") -> dict:
    """Writes cifar-10(0)-{python,binary}.tar.gz with N_TRAIN/N_TEST images."""
    os.makedirs(root, exist_ok=True)
    fine_n = 10 if name == "cifar10" else 100
    splits = {}
    for split, n, off in (("train", N_TRAIN, 0), ("test", N_TEST, 100)):
        imgs = _tagged_images(n, 32, 32, 3, off)
        fine = (np.arange(n) * 3 + off) % fine_n
        coarse = fine % 20
        splits[split] = (imgs, fine, coarse)
    suffix = "python" if kind == "py" else "binary"
    ten = name == "cifar10"
    archive = os.path.join(root, f"{'cifar-10' if ten else 'cifar-100'}-{suffix}.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        if kind == "py":
            top = "cifar-10-batches-py" if ten else "cifar-100-python"

            def batch(imgs, fine, coarse):
                d = {b"data": imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)}
                d[b"filenames"] = [f"img{i}.png".encode() for i in range(len(imgs))]
                if ten:
                    d[b"labels"] = [int(x) for x in fine]
                else:
                    d[b"fine_labels"] = [int(x) for x in fine]
                    d[b"coarse_labels"] = [int(x) for x in coarse]
                return pickle.dumps(d)

            if ten:
                imgs, fine, coarse = splits["train"]
                for b, part in enumerate(np.array_split(np.arange(N_TRAIN), 5)):
                    _add(tar, f"{top}/data_batch_{b + 1}", batch(imgs[part], fine[part], None))
                _add(tar, f"{top}/test_batch", batch(*splits["test"][:2], None))
                meta = {b"label_names": [b"a"] * 10}
                _add(tar, f"{top}/batches.meta", pickle.dumps(meta))
            else:
                _add(tar, f"{top}/train", batch(*splits["train"]))
                _add(tar, f"{top}/test", batch(*splits["test"]))
                meta = {
                    b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                    b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
                }
                _add(tar, f"{top}/meta", pickle.dumps(meta))
        else:
            top = "cifar-10-batches-bin" if ten else "cifar-100-binary"

            def records(imgs, fine, coarse):
                pix = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)
                lab = fine[:, None] if ten else np.stack([coarse, fine], 1)
                return np.concatenate([lab.astype(np.uint8), pix], 1).tobytes()

            if ten:
                imgs, fine, coarse = splits["train"]
                for b, part in enumerate(np.array_split(np.arange(N_TRAIN), 5)):
                    _add(
                        tar,
                        f"{top}/data_batch_{b + 1}.bin",
                        records(imgs[part], fine[part], coarse[part]),
                    )
                _add(tar, f"{top}/test_batch.bin", records(*splits["test"]))
            else:
                _add(tar, f"{top}/train.bin", records(*splits["train"]))
                _add(tar, f"{top}/test.bin", records(*splits["test"]))
                names = "\n".join(f"fine{i}" for i in range(100)).encode()
                _add(tar, f"{top}/fine_label_names.txt", names)
    return splits


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """(cfg, raw arrays) for a prepared tiny Fashion-MNIST."""
    root = tmp_path_factory.mktemp("fmnist")
    raw = write_fashion_mnist(root / "manual")
    cfg = data.get_config_defaults()
    cfg.data_dir = str(root / "tfds")
    cfg.manual_dir = str(root / "manual")
    prepare_lib.prepare("fashion_mnist", cfg.manual_dir, cfg.data_dir, progress=False)
    return cfg, raw


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    raw = write_cifar(root / "manual", "cifar10")
    cfg = data.get_config_defaults()
    cfg.name = "cifar10"
    cfg.data_dir = str(root / "tfds")
    cfg.manual_dir = str(root / "manual")
    prepare_lib.prepare("cifar10", cfg.manual_dir, cfg.data_dir, progress=False)
    return cfg, raw


def _ids(batch, cfg_name="fashion_mnist", pad=2) -> np.ndarray:
    """Recovers the example tags (pixel (0,0,0)) of an unaugmented batch; shape [D*b]."""
    spec = registry.get_spec(cfg_name)
    x = batch["image"].reshape((-1,) + batch["image"].shape[2:])
    v = (x[:, pad, pad, 0] * spec.std[0] + spec.mean[0]) * 255.0
    return np.rint(v).astype(np.int64)


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------


def test_prepare_fashion_mnist_roundtrip_and_idempotent(tmp_path, capsys):
    import tensorflow_datasets as tfds

    raw = write_fashion_mnist(tmp_path / "manual")
    dd = str(tmp_path / "tfds")
    path = data.prepare("fashion_mnist", str(tmp_path / "manual"), dd)
    assert path == os.path.join(dd, "fashion_mnist", "3.0.1")
    assert sorted(os.listdir(os.path.join(dd, "fashion_mnist"))) == ["3.0.1"]  # no temp dirs
    ds = tfds.data_source("fashion_mnist", data_dir=dd, download=False)
    assert len(ds["train"]) == N_TRAIN and len(ds["test"]) == N_TEST
    for split, prefix in (("train", "train"), ("test", "t10k")):
        imgs, labels = raw[prefix]
        for i in (0, 5, len(labels) - 1):
            ex = ds[split][i]
            np.testing.assert_array_equal(ex["image"][..., 0], imgs[i])
            assert ex["label"] == labels[i]

    mtime = os.path.getmtime(os.path.join(path, "dataset_info.json"))
    assert data.prepare("fashion_mnist", str(tmp_path / "manual"), dd) == path
    assert prepare_main(["--dataset=fashion_mnist", f"--data_dir={dd}"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == mtime


@pytest.mark.parametrize(
    "name,kind", [("cifar10", "py"), ("cifar10", "bin"), ("cifar100", "py"), ("cifar100", "bin")]
)
def test_prepare_cifar(tmp_path, name, kind):
    import tensorflow_datasets as tfds

    raw = write_cifar(tmp_path / "manual", name, kind)
    dd = str(tmp_path / "tfds")
    rc = prepare_main(
        [f"--dataset={name}", f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={dd}"]
        + ["--no_progress"]
    )
    assert rc == 0
    builder = tfds.builder_from_directory(os.path.join(dd, name, "3.0.2"))
    assert builder.info.features["label"].num_classes == (10 if name == "cifar10" else 100)
    for split in ("train", "test"):
        src = builder.as_data_source(split)
        imgs, fine, coarse = raw[split]
        assert len(src) == len(fine)
        for i in (0, 7, len(fine) - 1):
            ex = src[i]
            np.testing.assert_array_equal(ex["image"], imgs[i])
            assert ex["label"] == fine[i]
            assert ex["id"] == f"{split}_{i:05d}".encode()
            if name == "cifar100":
                assert ex["coarse_label"] == coarse[i]
    if name == "cifar100":
        assert builder.info.features["coarse_label"].num_classes == 20
        assert builder.info.features["label"].names[3] == "fine3"


def test_truncated_idx_gives_one_line_error_and_leaves_nothing(tmp_path):
    write_fashion_mnist(tmp_path / "manual")
    bad = tmp_path / "manual" / "train-images-idx3-ubyte.gz"
    payload = bad.read_bytes()
    bad.write_bytes(payload[: len(payload) // 2])
    dd = tmp_path / "tfds"
    with pytest.raises(data.DataPrepareError) as err:
        data.prepare("fashion_mnist", str(tmp_path / "manual"), str(dd), progress=False)
    msg = str(err.value)
    assert str(bad) in msg and "truncated" in msg and "\n" not in msg
    assert not data.is_prepared("fashion_mnist", str(dd))
    assert not (dd / "fashion_mnist").exists() or not os.listdir(dd / "fashion_mnist")


def test_idx_with_wrong_length_is_reported(tmp_path):
    write_fashion_mnist(tmp_path / "manual")
    _write_idx(tmp_path / "manual" / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(data.DataPrepareError, match="t10k-labels-idx1-ubyte.gz holds 3 labels"):
        data.prepare("fashion_mnist", str(tmp_path / "manual"), str(tmp_path / "d"))


def test_truncated_and_wrong_cifar_archives(tmp_path, capsys):
    write_cifar(tmp_path / "m", "cifar100")
    archive = tmp_path / "m" / "cifar-100-python.tar.gz"
    payload = archive.read_bytes()
    archive.write_bytes(payload[: len(payload) - 200])
    rc = prepare_main(
        ["--dataset=cifar100", f"--manual_dir={tmp_path / 'm'}", f"--data_dir={tmp_path / 'd'}"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(archive) in err and "truncated" in err and "\n" not in err
    assert not data.is_prepared("cifar100", str(tmp_path / "d"))

    # A CIFAR-10 archive renamed as CIFAR-100 is the wrong archive.
    write_cifar(tmp_path / "m10", "cifar10")
    os.rename(
        tmp_path / "m10" / "cifar-10-python.tar.gz", tmp_path / "m10" / "cifar-100-python.tar.gz"
    )
    with pytest.raises(data.DataPrepareError, match="does not contain cifar-100-python/train"):
        data.prepare("cifar100", str(tmp_path / "m10"), str(tmp_path / "d"))

    # Labels out of range.
    write_cifar(tmp_path / "mb", "cifar10", kind="bin")
    with tarfile.open(tmp_path / "mb" / "cifar-10-binary.tar.gz", "w:gz") as tar:
        rec = np.zeros((2, 3073), np.uint8)
        rec[:, 0] = 12
        for b in range(1, 6):
            _add(tar, f"cifar-10-batches-bin/data_batch_{b}.bin", rec.tobytes())
        _add(tar, "cifar-10-batches-bin/test_batch.bin", rec.tobytes())
    with pytest.raises(data.DataPrepareError, match=r"labels in \[12, 12\]"):
        data.prepare("cifar10", str(tmp_path / "mb"), str(tmp_path / "d"))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--dataset must have a value"),
        (["--dataset=mnist"], "--dataset=mnist: value should be one of"),
        (["--dataset=cifar10", "--bogus=1"], "Unknown command line flag 'bogus'"),
        (["--dataset=cifar10", "--force=maybe"], "--force=maybe"),
    ],
    ids=["no_dataset", "unknown_dataset", "unknown_flag", "bad_bool"],
)
def test_cli_bad_flags_are_one_line_errors_with_exit_code_2(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        prepare_main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err


def test_cli_missing_sources_and_stray_arguments_exit_2(tmp_path, capsys):
    rc = prepare_main(
        ["--dataset=cifar10", f"--manual_dir={tmp_path / 'none'}", f"--data_dir={tmp_path / 'd'}"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cifar-10-python.tar.gz not found" in err and "\n" not in err
    assert prepare_main(["--dataset=cifar10", "stray"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unexpected arguments ['stray']: every setting is a --flag"
    )
    assert not os.path.exists(tmp_path / "d" / "cifar10")
    # A flag set in one call does not leak into the next (absl's flags are global).
    where = [f"--manual_dir={tmp_path / 'none'}", f"--data_dir={tmp_path / 'd'}"]
    assert prepare_main(["--dataset=cifar10", "--force", *where]) == 2
    assert data_cli._FORCE.value is True
    assert prepare_main(["--dataset=cifar10", *where]) == 2
    assert data_cli._FORCE.value is False
    capsys.readouterr()


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz not found"):
        data.prepare("cifar10", str(tmp_path / "nothing"), str(tmp_path / "d"))
    cfg = data.get_config_defaults()
    cfg.name = "cifar100"
    cfg.data_dir = str(tmp_path / "d")
    cfg.manual_dir = str(tmp_path / "nothing")
    cfg.auto_prepare = False
    with pytest.raises(FileNotFoundError, match="python -m qat_jax.data --dataset=cifar100"):
        data.dataset_info(cfg)
    cfg.auto_prepare = True
    with pytest.raises(FileNotFoundError, match="auto-prepare failed.*run: python -m qat_jax"):
        data.dataset_info(cfg)
    cfg.name = "imagenet2012"
    with pytest.raises(
        FileNotFoundError, match="tfds build imagenet2012 --file_format=array_record"
    ):
        data.dataset_info(cfg)


def test_auto_prepare_on_first_use(tmp_path):
    write_fashion_mnist(tmp_path / "manual")
    cfg = data.get_config_defaults()
    cfg.data_dir = str(tmp_path / "tfds")
    cfg.manual_dir = str(tmp_path / "manual")
    assert not data.is_prepared("fashion_mnist", cfg.data_dir)
    info = data.dataset_info(cfg)
    assert data.is_prepared("fashion_mnist", cfg.data_dir)
    assert info.num_train == N_TRAIN and info.num_eval == N_TEST
    assert info.image_shape == (32, 32, 1) and info.num_classes == 10
    assert info.label_names[0] == "T-shirt/top"


# --------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------


def _train(cfg, batch, seed=0, d=1, p=0, n=1):
    return data.make_train_iterator(
        cfg, batch, seed=seed, num_local_devices=d, process_index=p, process_count=n
    )


def test_train_batches_shapes_and_padding(fmnist):
    cfg, raw = fmnist
    it = _train(cfg, 8, d=2)
    b = next(it)
    assert b["image"].shape == (2, 4, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (2, 4) and b["label"].dtype == np.int32
    ids = _ids(b)
    imgs, labels = raw["train"]
    np.testing.assert_array_equal(b["label"].reshape(-1), labels[ids])
    x = b["image"].reshape(8, 32, 32)
    spec = registry.get_spec("fashion_mnist")
    px = np.rint((x * spec.std[0] + spec.mean[0]) * 255).astype(np.int64)
    np.testing.assert_array_equal(px[:, 2:30, 2:30], imgs[ids])  # centred, unaugmented
    assert (px[:, :2] == 0).all() and (px[:, :, 30:] == 0).all()  # zero padding


def test_epochs_cover_each_example_once_and_reshuffle(fmnist):
    cfg, _ = fmnist
    it = _train(cfg, 8)
    epochs = [np.concatenate([_ids(next(it)) for _ in range(5)]) for _ in range(2)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(N_TRAIN))
    assert (epochs[0] != epochs[1]).any()
    # batches straddling an epoch boundary: 40 examples, batch 16
    it = _train(cfg, 16)
    stream = np.concatenate([_ids(next(it)) for _ in range(5)])  # 80 = two epochs
    assert sorted(stream[:40].tolist()) == list(range(N_TRAIN))
    assert sorted(stream[40:].tolist()) == list(range(N_TRAIN))


def test_seed_changes_order(fmnist):
    cfg, _ = fmnist
    a = _ids(next(_train(cfg, 8, seed=0)))
    b = _ids(next(_train(cfg, 8, seed=1)))
    c = _ids(next(_train(cfg, 8, seed=0)))
    assert (a != b).any()
    np.testing.assert_array_equal(a, c)


def test_two_process_sharding(fmnist):
    cfg, _ = fmnist
    single = _train(cfg, 8)
    procs = [_train(cfg, 8, d=2, p=p, n=2) for p in range(2)]
    seen = []
    for _ in range(5):  # one epoch
        whole = _ids(next(single))
        parts = [next(it) for it in procs]
        assert parts[0]["image"].shape == (2, 2, 32, 32, 1)
        got = np.concatenate([_ids(b) for b in parts])
        np.testing.assert_array_equal(got, whole)  # union == single-process batch, in order
        seen.extend(got.tolist())
    assert sorted(seen) == list(range(N_TRAIN))


def test_exact_resume(cifar10):
    cfg, _ = cifar10  # crop_flip augmentation on
    ref = _train(cfg, 16, seed=3, d=2)
    ref_batches = [next(ref) for _ in range(9)]
    it = _train(cfg, 16, seed=3, d=2)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 4
    it.close()
    resumed = _train(cfg, 16, seed=3, d=2)
    resumed.set_state(state)
    for k in range(4, 9):
        b = next(resumed)
        for key in ("image", "label"):
            np.testing.assert_array_equal(b[key], ref_batches[k][key])
    assert resumed.get_state()["step"] == 9
    # Restoring into a 2-process run continues the same global stream.
    p1 = _train(cfg, 16, seed=3, d=1, p=1, n=2)
    p1.set_state(state)
    np.testing.assert_array_equal(
        next(p1)["image"][0], ref_batches[4]["image"].reshape(16, 32, 32, 3)[8:]
    )
    with pytest.raises(ValueError, match="seed"):
        _train(cfg, 16, seed=4).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _train(cfg, 32, seed=3).set_state(state)


def test_augmentation_deterministic_and_effective(cifar10):
    cfg, raw = cifar10
    a = next(_train(cfg, 40, seed=5))
    b = next(_train(cfg, 40, seed=5, d=2, p=0, n=1))
    np.testing.assert_array_equal(a["image"].reshape(b["image"].shape), b["image"])
    c = next(_train(cfg, 40, seed=6))
    # Same examples (whole epoch) but different crops/flips under another seed.
    assert sorted(a["label"].ravel().tolist()) == sorted(c["label"].ravel().tolist())
    cfg_none = cfg.copy_and_resolve_references()
    cfg_none.augment = "none"
    plain = next(_train(cfg_none, 40, seed=5))
    np.testing.assert_array_equal(plain["label"], a["label"])  # augmentation keeps order
    assert not np.allclose(plain["image"], a["image"])
    spec = registry.get_spec("cifar10")
    x = plain["image"][0] * np.asarray(spec.std) + np.asarray(spec.mean)
    tags = np.rint(x[:, 0, 0, 0] * 255).astype(np.int64)
    np.testing.assert_array_equal(raw["train"][1][tags], plain["label"][0])


def test_augmentation_worker_count_independent(cifar10):
    cfg, _ = cifar10
    ref = _train(cfg, 8, seed=2)
    ref_b = [next(ref) for _ in range(3)]
    cfg_w = cfg.copy_and_resolve_references()
    cfg_w.worker_count = 2
    cfg_w.read_threads = 0
    it = _train(cfg_w, 8, seed=2)
    try:
        for k in range(3):
            np.testing.assert_array_equal(next(it)["image"], ref_b[k]["image"])
    finally:
        it.close()


def test_preprocessor_units():
    u = uniforms(1, np.array([0, 0, 1]), np.array([5, 6, 5]), 4)
    assert u.shape == (3, 4) and (u >= 0).all() and (u < 1).all()
    np.testing.assert_array_equal(u, uniforms(1, np.array([0, 0, 1]), np.array([5, 6, 5]), 4))
    assert len({tuple(r) for r in u}) == 3
    img = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8)
    rrc = Preprocessor(24, 3, "rrc_flip", (0.5,) * 3, (0.25,) * 3, eval_resize=True)
    draws = uniforms(0, [0], [0], rrc.num_draws)[0]
    out = rrc.train(img, draws)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rrc.train(img, draws))
    assert rrc.base(img).shape == (24, 24, 3)
    cf = Preprocessor(32, 1, "crop_flip", (0.5,), (0.25,))
    g = np.full((28, 28, 1), 200, np.uint8)
    assert cf.train(g, np.array([0.0, 0.0, 0.9])).shape == (32, 32, 1)
    assert cf.normalize(g[None]).dtype == np.float32
    from qat_jax.data.preparation import encode_png

    np.testing.assert_array_equal(decode_image(encode_png(img), 3), img)
    with pytest.raises(ValueError):
        Preprocessor(32, 1, "bogus", (0.5,), (0.25,))


def test_batch_size_validation(fmnist):
    cfg, _ = fmnist
    with pytest.raises(ValueError, match="multiple of process_count \\* num_local_devices"):
        _train(cfg, 10, d=4)
    with pytest.raises(ValueError, match="global_batch_size 6"):
        data.make_eval_batches(cfg, 6, num_local_devices=2, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        _train(cfg, 8, p=2, n=2)


@pytest.mark.parametrize("nproc,ndev,batch", [(1, 1, 8), (1, 2, 4), (2, 2, 8), (2, 1, 6)])
def test_eval_masks_count_every_example_once(fmnist, nproc, ndev, batch):
    cfg, raw = fmnist
    seen, mask_total = [], 0.0
    per_proc_batches = []
    for p in range(nproc):
        ev = data.make_eval_batches(
            cfg, batch, num_local_devices=ndev, process_index=p, process_count=nproc
        )
        assert len(ev) == -(-N_TEST // batch)
        batches = list(ev)
        assert len(batches) == len(ev) and len(list(ev)) == len(ev)  # re-iterable
        per_proc_batches.append(len(batches))
        for b in batches:
            shape = (ndev, batch // (nproc * ndev))
            assert b["mask"].shape == shape and b["mask"].dtype == np.float32
            assert b["image"].shape == shape + (32, 32, 1)
            m = b["mask"].reshape(-1) > 0
            ids = _ids(b)[m] - 100
            np.testing.assert_array_equal(b["label"].reshape(-1)[m], raw["t10k"][1][ids])
            assert (b["image"].reshape(len(m), -1)[~m] == 0).all()
            seen.extend(ids.tolist())
            mask_total += b["mask"].sum()
    assert len(set(per_proc_batches)) == 1
    assert mask_total == N_TEST
    assert sorted(seen) == list(range(N_TEST))


def test_eval_cache_resolves_once_and_matches_make_eval_batches(fmnist, monkeypatch):
    """The trainer's evaluations (whole split, and the first N after each stage) reuse one
    resolution and one reader; their batches are those of make_eval_batches."""
    import copy

    from qat_jax.data import iterators

    cfg, _ = fmnist
    limited = copy.deepcopy(cfg)
    limited.num_eval_examples = 5
    expected = {
        "whole": list(data.make_eval_batches(cfg, 4, num_local_devices=2)),
        "limited": list(data.make_eval_batches(limited, 4, num_local_devices=2)),
    }
    calls = []
    real_resolve = iterators.resolve
    monkeypatch.setattr(iterators, "resolve", lambda c: calls.append(c) or real_resolve(c))
    cache = data.EvalCache()
    for _ in range(3):  # three stage boundaries
        for name, c in (("whole", cfg), ("limited", limited)):
            ev = cache.get(c, 4, num_local_devices=2)
            got = list(ev)
            assert len(got) == len(ev) == len(expected[name])
            for a, b in zip(got, expected[name], strict=True):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k].dtype == b[k].dtype
                    np.testing.assert_array_equal(a[k], b[k])
    assert len(calls) == 1 and cache.num_resolved == 1
    assert cache.get(limited, 4, num_local_devices=2).num_examples == 5
    assert cache.get(cfg, 4, num_local_devices=2).num_examples == N_TEST
    cache.get(cfg, 4, num_local_devices=1)  # another layout: resolved on its own
    assert cache.num_resolved == 2
    with pytest.raises(ValueError, match="num_eval_examples must be -1"):
        cache.get(cfg, 4, num_local_devices=2).first(0)


def test_import_is_light_and_cli_runs_as_module(fmnist):
    """`import qat_jax.data` loads neither TFDS nor grain; `python -m qat_jax.data` is the CLI."""
    import subprocess
    import sys

    code = (
        "import sys, qat_jax.data; "
        "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'tensorflow') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"
    cfg, _ = fmnist
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "qat_jax.data",
            "--dataset=fashion_mnist",
            f"--data_dir={cfg.data_dir}",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0 and "already prepared" in p.stdout
    assert "Warning" not in p.stderr, p.stderr
    # absl flags: a bad value is one line on stderr and exit code 2 through app.run too.
    p = subprocess.run(
        [sys.executable, "-m", "qat_jax.data", "--dataset=mnist"], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.startswith("error: flag --dataset=mnist"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_example_limits_and_coarse_labels(tmp_path):
    write_cifar(tmp_path / "m", "cifar100")
    cfg = data.get_config_defaults()
    cfg.name = "cifar100"
    cfg.data_dir = str(tmp_path / "d")
    cfg.manual_dir = str(tmp_path / "m")
    cfg.label_key = "coarse_label"
    cfg.num_train_examples = 24
    cfg.num_eval_examples = 5
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (20, 24, 5)
    assert info.image_shape == (32, 32, 3)
    it = _train(cfg, 8)
    labels = np.concatenate([next(it)["label"].ravel() for _ in range(3)])
    assert labels.max() < 20
    ev = data.make_eval_batches(cfg, 4, num_local_devices=1, process_index=0, process_count=1)
    assert len(ev) == 2 and sum(b["mask"].sum() for b in ev) == 5
    cfg.label_key = "nope"
    with pytest.raises(ValueError, match="label_key 'nope'"):
        data.dataset_info(cfg)


def test_imagenet_style_prepared_dir(tmp_path):
    """A TFDS dir with variable-size JPEGs (like `tfds build imagenet2012`) is read + cropped."""
    import tensorflow_datasets as tfds
    from PIL import Image

    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000),
            "file_name": tfds.features.Text(),
        }
    )
    rng = np.random.default_rng(0)

    def examples(n):
        for i in range(n):
            h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
            bio = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(bio, "JPEG")
            yield {"image": bio.getvalue(), "label": i * 37 % 1000, "file_name": f"{i}.JPEG"}

    target = tmp_path / "d" / "imagenet2012" / "5.1.0"
    prepare_lib.write_tfds_dataset(
        "imagenet2012",
        "5.1.0",
        features,
        {"train": (12, examples(12)), "validation": (5, examples(5))},
        str(target),
    )
    cfg = data.get_config_defaults()
    cfg.name = "imagenet2012"
    cfg.data_dir = str(tmp_path / "d")
    cfg.image_size = 24
    cfg.eval_split = "validation"
    info = data.dataset_info(cfg)
    assert info.num_classes == 1000 and info.image_shape == (24, 24, 3)
    b = next(_train(cfg, 4, d=2))
    assert b["image"].shape == (2, 2, 24, 24, 3)
    np.testing.assert_array_equal(b["image"], next(_train(cfg, 4, d=2))["image"])
    ev = data.make_eval_batches(cfg, 4, num_local_devices=1, process_index=0, process_count=1)
    batches = list(ev)
    assert len(batches) == 2 and sum(x["mask"].sum() for x in batches) == 5
    assert batches[0]["image"].shape == (1, 4, 24, 24, 3)
