"""Read and write ``.safetensors`` files with numpy only (no torch, no ``safetensors`` package).

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian uint64 ``N``, an
``N``-byte UTF-8 JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``, then the byte buffer; offsets are relative to the buffer, tensors
are little-endian and row-major. Files written by ``safetensors.torch.save_file`` read back
identically (tested in tests/test_torch_import.py).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

__all__ = ["read_safetensors", "write_safetensors"]

_TO_NUMPY = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_FROM_NUMPY = {v.name: k for k, v in _TO_NUMPY.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``.safetensors`` file (native byte order)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack_from("<Q", blob, 0)
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    buf = memoryview(blob)[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in _TO_NUMPY:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t['dtype']}")
        begin, end = t["data_offsets"]
        dt = _TO_NUMPY[t["dtype"]]
        arr = np.frombuffer(buf[begin:end], dtype=dt).reshape(t["shape"])
        out[name] = arr.astype(dt.newbyteorder("=")) if dt.byteorder == "<" else arr.copy()
    return out


def write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (numpy arrays of a supported dtype) as a ``.safetensors`` file."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if arr.dtype.name not in _FROM_NUMPY:
            raise TypeError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
        raw = np.ascontiguousarray(arr.astype(_TO_NUMPY[_FROM_NUMPY[arr.dtype.name]])).tobytes()
        header[name] = {
            "dtype": _FROM_NUMPY[arr.dtype.name],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the reference implementation aligns the buffer to 8
    path = os.path.abspath(path)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    os.replace(path + ".tmp", path)
