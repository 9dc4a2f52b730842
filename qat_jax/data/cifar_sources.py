"""Readers of the CIFAR-10 / CIFAR-100 source files, into checked numpy arrays.

Any of: the "python" archives (pickled batches, ``cifar-10-python.tar.gz``,
``cifar-100-python.tar.gz``), the "binary" archives (``cifar-10-binary.tar.gz``,
``cifar-100-binary.tar.gz``) or an already extracted ``cifar-10-batches-py`` /
``cifar-100-python`` directory. Errors as in :mod:`qat_jax.data.sources`: one line naming the
file and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable

import numpy as np

from qat_jax.data.sources import DataPrepareError, SplitArrays, check_labels

__all__ = ["read_cifar", "cifar_candidates", "CIFAR10_LABEL_NAMES"]

CIFAR10_LABEL_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_CIFAR_PIXELS = 32 * 32 * 3


@dataclasses.dataclass
class _CifarLayout:
    archive: str  # file name in manual_dir
    top: str  # top-level directory inside the archive
    train: tuple[str, ...]
    test: tuple[str, ...]
    kind: str  # 'py' or 'bin'


_LAYOUTS = {
    "cifar10": (
        _CifarLayout(
            "cifar-10-python.tar.gz",
            "cifar-10-batches-py",
            tuple(f"data_batch_{i}" for i in range(1, 6)),
            ("test_batch",),
            "py",
        ),
        _CifarLayout(
            "cifar-10-binary.tar.gz",
            "cifar-10-batches-bin",
            tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            ("test_batch.bin",),
            "bin",
        ),
    ),
    "cifar100": (
        _CifarLayout("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), "py"),
        _CifarLayout(
            "cifar-100-binary.tar.gz", "cifar-100-binary", ("train.bin",), ("test.bin",), "bin"
        ),
    ),
}


def cifar_candidates(name: str, manual_dir: str | os.PathLike) -> list[str]:
    """Paths that :func:`read_cifar` looks for, in order of preference."""
    manual_dir = os.fspath(manual_dir)
    paths = []
    for layout in _LAYOUTS[name]:
        paths.append(os.path.join(manual_dir, layout.archive))
        paths.append(os.path.join(manual_dir, layout.top))
    return paths


def read_cifar(
    name: str, manual_dir: str | os.PathLike
) -> tuple[dict[str, SplitArrays], dict[str, list[str] | None]]:
    """Reads CIFAR-10 or CIFAR-100 from the standard archives in ``manual_dir``.

    Looks for (in order) ``cifar-10[0]-python.tar.gz``, the extracted python directory,
    ``cifar-10[0]-binary.tar.gz`` and the extracted binary directory.

    Args:
      name: ``'cifar10'`` or ``'cifar100'``.
      manual_dir: directory holding the archive.

    Returns:
      ``(splits, label_names)``: ``splits`` maps ``'train'``/``'test'`` to :class:`SplitArrays`
      with images uint8 ``[N, 32, 32, 3]`` and labels ``'label'`` (CIFAR-100: the fine label,
      plus ``'coarse_label'``); ``label_names`` maps each label key to its class names (or None
      if the archive carries none).
    """
    if name not in _LAYOUTS:
        raise ValueError(f"unknown CIFAR variant {name!r}")
    manual_dir = os.fspath(manual_dir)
    fix = f"download {_CIFAR_URLS[name]} into {manual_dir} (or pass --manual_dir)"
    for layout in _LAYOUTS[name]:
        archive = os.path.join(manual_dir, layout.archive)
        extracted = os.path.join(manual_dir, layout.top)
        fix_layout = (
            f"re-download {layout.archive} from "
            f"{_CIFAR_URLS[name].rsplit('/', 1)[0]}/{layout.archive} into {manual_dir}"
        )
        if os.path.isfile(archive):
            return _read_cifar_archive(name, layout, archive, fix_layout)
        if os.path.isdir(extracted):
            return _read_cifar_files(
                name, layout, extracted, _dir_reader(extracted, fix_layout), fix_layout
            )
    raise FileNotFoundError(
        f"{os.path.join(manual_dir, _LAYOUTS[name][0].archive)} not found "
        f"(nor the binary variant or an extracted directory); {fix}"
    )


def _dir_reader(root: str, fix: str) -> Callable[[str], bytes]:
    def read(member: str) -> bytes:
        path = os.path.join(root, member)
        if not os.path.isfile(path):
            raise DataPrepareError(f"{path} is missing from the extracted CIFAR directory; {fix}")
        with open(path, "rb") as f:
            return f.read()

    return read


def _read_cifar_archive(name, layout, archive, fix):
    try:
        with tarfile.open(archive, "r:gz") as tar:
            wanted = {
                f"{layout.top}/{m}"
                for m in layout.train + layout.test + _meta_members(name, layout)
            }
            contents: dict[str, bytes] = {}
            for member in tar:
                if member.isfile() and member.name in wanted:
                    f = tar.extractfile(member)
                    assert f is not None
                    contents[member.name] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataPrepareError(
            f"{archive} is truncated or not a gzip tar archive ({type(e).__name__}: {e}); {fix}"
        ) from None

    def read(member: str) -> bytes:
        key = f"{layout.top}/{member}"
        if key not in contents:
            raise DataPrepareError(
                f"{archive} does not contain {key} (wrong or truncated archive); {fix}"
            )
        return contents[key]

    return _read_cifar_files(name, layout, archive, read, fix)


def _meta_members(name, layout) -> tuple[str, ...]:
    if layout.kind == "py":
        return ("batches.meta",) if name == "cifar10" else ("meta",)
    return (
        ("batches.meta.txt",)
        if name == "cifar10"
        else (
            "fine_label_names.txt",
            "coarse_label_names.txt",
        )
    )


def _read_cifar_files(name, layout, source, read, fix):
    num_fine = 10 if name == "cifar10" else 100
    splits = {}
    for split, members in (("train", layout.train), ("test", layout.test)):
        parts = [
            _parse_cifar_py(name, read(m), f"{source}:{m}", fix)
            if layout.kind == "py"
            else _parse_cifar_bin(name, read(m), f"{source}:{m}", fix)
            for m in members
        ]
        images = np.concatenate([p[0] for p in parts])
        labels = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
        check_labels(labels["label"], num_fine, f"{source} ({split})", fix)
        if "coarse_label" in labels:
            check_labels(labels["coarse_label"], 20, f"{source} ({split})", fix)
        splits[split] = SplitArrays(images, labels)
    names = _read_cifar_names(name, layout, read)
    return splits, names


def _parse_cifar_py(name, raw: bytes, where: str, fix: str):
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataPrepareError(
            f"{where} is not a valid pickled CIFAR batch ({type(e).__name__}); {fix}"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch:
        raise DataPrepareError(f"{where} is not a pickled CIFAR batch (no b'data' key); {fix}")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS or data.dtype != np.uint8:
        raise DataPrepareError(
            f"{where} holds data of shape {data.shape} dtype {data.dtype}, expected "
            f"[N, {_CIFAR_PIXELS}] uint8; {fix}"
        )
    keys = (
        {"label": b"labels"}
        if name == "cifar10"
        else {
            "label": b"fine_labels",
            "coarse_label": b"coarse_labels",
        }
    )
    labels = {}
    for key, raw_key in keys.items():
        if raw_key not in batch:
            raise DataPrepareError(f"{where} has no {raw_key!r} entry (wrong archive?); {fix}")
        lab = np.asarray(batch[raw_key], dtype=np.int64)
        if lab.shape != (data.shape[0],):
            raise DataPrepareError(
                f"{where} has {lab.shape[0]} {raw_key.decode()} for {data.shape[0]} images; {fix}"
            )
        labels[key] = lab
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _parse_cifar_bin(name, raw: bytes, where: str, fix: str):
    n_label_bytes = 1 if name == "cifar10" else 2
    rec = n_label_bytes + _CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % rec:
        raise DataPrepareError(
            f"{where} has {len(raw)} bytes, not a multiple of the {rec}-byte record size "
            f"(truncated or wrong file); {fix}"
        )
    arr = np.frombuffer(raw, np.uint8).reshape(-1, rec)
    images = arr[:, n_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if name == "cifar10":
        labels = {"label": arr[:, 0].astype(np.int64)}
    else:
        labels = {"coarse_label": arr[:, 0].astype(np.int64), "label": arr[:, 1].astype(np.int64)}
    return np.ascontiguousarray(images), labels


def _read_cifar_names(name, layout, read) -> dict[str, list[str] | None]:
    def lines(member):
        try:
            text = read(member).decode("utf-8")
        except (DataPrepareError, UnicodeDecodeError):
            return None
        out = [x.strip() for x in text.splitlines() if x.strip()]
        return out or None

    if name == "cifar10":
        return {"label": list(CIFAR10_LABEL_NAMES)}
    names: dict[str, list[str] | None] = {"label": None, "coarse_label": None}
    if layout.kind == "py":
        try:
            meta = pickle.loads(read("meta"), encoding="bytes")
            names["label"] = [x.decode() for x in meta[b"fine_label_names"]]
            names["coarse_label"] = [x.decode() for x in meta[b"coarse_label_names"]]
        except Exception:  # noqa: BLE001 - names are optional; fall back to numbers
            pass
    else:
        names["label"] = lines("fine_label_names.txt")
        names["coarse_label"] = lines("coarse_label_names.txt")
    if names["label"] is not None and len(names["label"]) != 100:
        names["label"] = None
    if names["coarse_label"] is not None and len(names["coarse_label"]) != 20:
        names["coarse_label"] = None
    return names
