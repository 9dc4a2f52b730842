"""Readers for the raw source files of the locally prepared datasets: what they share, and
Fashion-MNIST's.

Every reader returns plain numpy arrays (:class:`SplitArrays`) and checks what it reads (magic
numbers, counts, shapes, label ranges). Problems are reported as a one-line
:class:`DataPrepareError` (or :class:`FileNotFoundError` for a missing file) that names the file
and the fix.

* Fashion-MNIST (here): gzip-compressed IDX files (``train-images-idx3-ubyte.gz`` ...).
* CIFAR-10 / CIFAR-100: :mod:`qat_jax.data.cifar_sources` (archives or extracted directories).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib

import numpy as np

__all__ = [
    "DataPrepareError",
    "SplitArrays",
    "read_idx",
    "read_fashion_mnist",
    "check_labels",
    "FASHION_MNIST_LABEL_NAMES",
]

FASHION_MNIST_LABEL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataPrepareError(ValueError):
    """A source file exists but is truncated, corrupt or not what was expected."""


@dataclasses.dataclass
class SplitArrays:
    """Decoded arrays of one split.

    Attributes:
      images: uint8 ``[N, H, W, C]``.
      labels: dict of label name -> int64 ``[N]`` (e.g. ``{'label': ..., 'coarse_label': ...}``).
    """

    images: np.ndarray
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------------------
# IDX (Fashion-MNIST)
# --------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike, *, fix: str = "") -> np.ndarray:
    """Reads a (gzip-compressed or plain) IDX file into a numpy array.

    Args:
      path: ``*.gz`` or uncompressed IDX file.
      fix: text appended to error messages telling the user how to fix the file.

    Returns:
      uint8 array with the shape stored in the IDX header.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; {fix}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataPrepareError(
            f"{path} is truncated or not a valid gzip file ({type(e).__name__}: {e}); {fix}"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataPrepareError(f"{path} is not an IDX file (bad magic number); {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataPrepareError(f"{path} has a truncated IDX header; {fix}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataPrepareError(
            f"{path} is truncated or corrupt: header says shape {tuple(dims)} "
            f"({expected} bytes) but the file has {len(data)} bytes; {fix}"
        )
    return np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=header).reshape(dims)


def read_fashion_mnist(manual_dir: str | os.PathLike) -> dict[str, SplitArrays]:
    """Reads Fashion-MNIST from ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Returns:
      ``{'train': SplitArrays, 'test': SplitArrays}`` with images uint8 ``[N, 28, 28, 1]`` and
      ``labels['label']`` in ``[0, 10)``.
    """
    manual_dir = os.fspath(manual_dir)
    fix = (
        "install Debian's dataset-fashion-mnist package or put the original gzip IDX files "
        "from https://github.com/zalandoresearch/fashion-mnist into that directory "
        "(or pass --manual_dir)"
    )
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find_file(manual_dir, f"{prefix}-images-idx3-ubyte", fix)
        lbl_path = _find_file(manual_dir, f"{prefix}-labels-idx1-ubyte", fix)
        images = read_idx(img_path, fix=fix)
        labels = read_idx(lbl_path, fix=fix)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataPrepareError(
                f"{img_path} holds images of shape {images.shape[1:]}, expected (28, 28); {fix}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataPrepareError(
                f"{lbl_path} holds {labels.shape[0]} labels but {img_path} holds "
                f"{images.shape[0]} images; {fix}"
            )
        check_labels(labels, 10, lbl_path, fix)
        if images.shape[0] == 0:
            raise DataPrepareError(f"{img_path} holds no images; {fix}")
        out[split] = SplitArrays(images[..., None], {"label": labels.astype(np.int64)})
    return out


def _find_file(directory: str, stem: str, fix: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{os.path.join(directory, stem + '.gz')} not found; {fix}")


def check_labels(labels: np.ndarray, num_classes: int, path: str, fix: str) -> None:
    """A one-line :class:`DataPrepareError` when a label is outside ``[0, num_classes)``."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataPrepareError(
            f"{path} has labels in [{int(labels.min())}, {int(labels.max())}] but "
            f"expected [0, {num_classes}); {fix}"
        )
