"""The ``.qat`` container: a fixed preamble, a JSON header, 64-byte aligned little-endian tensors.

Byte layout (version 1; docs/deployment.md is the normative description)::

    offset  size  content
    0       8     magic, ASCII ``QATJAXBN``
    8       4     format version, uint32 little-endian (= 1)
    12      8     header length H in bytes, uint64 little-endian
    20      H     header, UTF-8 JSON (an object; see docs/deployment.md)
    20 + H  ...   zero bytes up to the data start D = the next multiple of 64 (D = 20 + H if aligned)
    D       ...   tensor data: tensor ``t`` occupies bytes ``[D + t.offset, D + t.offset + t.nbytes)``
                  in C (row-major) order, little-endian; every ``offset`` is a multiple of 64 and
                  the gaps are zero bytes

The header's ``"tensors"`` object maps a name to ``{"dtype", "shape", "offset", "nbytes"}``;
dtypes are ``float32``, ``uint32`` and ``int32``. Everything else in the header is free-form JSON
for the layer that uses the container (:mod:`qat_jax.export.graph`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

__all__ = ["MAGIC", "VERSION", "ALIGN", "write_container", "read_container", "FormatError"]

MAGIC = b"QATJAXBN"
VERSION = 1
ALIGN = 64
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length: 20 bytes
_DTYPES = {"float32": "<f4", "uint32": "<u4", "int32": "<i4"}


class FormatError(ValueError):
    """A file that is not a readable ``.qat`` container of a supported version."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_container(path: str, header: Mapping, tensors: Mapping[str, np.ndarray]) -> int:
    """Write ``header`` (JSON-able; its ``"tensors"`` key is set here) and ``tensors`` to ``path``.

    Returns:
      The file size in bytes.
    """
    table, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        arr = np.asarray(value)
        if arr.dtype.name not in _DTYPES:
            raise TypeError(f"tensor {name!r}: unsupported dtype {arr.dtype} ({sorted(_DTYPES)})")
        raw = np.ascontiguousarray(arr.astype(_DTYPES[arr.dtype.name])).tobytes()
        table[name] = {
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
            "offset": offset,
            "nbytes": len(raw),
        }
        blobs.append((offset, raw))
        offset = _align(offset + len(raw))
    head = json.dumps({**header, "tensors": table}, indent=None, sort_keys=False).encode("utf-8")
    data_start = _align(_PREAMBLE.size + len(head))
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_PREAMBLE.pack(MAGIC, VERSION, len(head)))
        f.write(head)
        f.write(b"\0" * (data_start - _PREAMBLE.size - len(head)))
        pos = 0
        for off, raw in blobs:
            f.write(b"\0" * (off - pos))
            f.write(raw)
            pos = off + len(raw)
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_container(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(header, tensors)`` of a ``.qat`` file (arrays in native byte order)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < _PREAMBLE.size:
        raise FormatError(f"{path}: too short for a .qat file")
    magic, version, hlen = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        raise FormatError(f"{path}: bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise FormatError(f"{path}: format version {version}, this reader reads {VERSION}")
    header = json.loads(blob[_PREAMBLE.size : _PREAMBLE.size + hlen].decode("utf-8"))
    data_start = _align(_PREAMBLE.size + hlen)
    tensors = {}
    for name, t in header["tensors"].items():
        start = data_start + int(t["offset"])
        raw = blob[start : start + int(t["nbytes"])]
        if len(raw) != int(t["nbytes"]):
            raise FormatError(f"{path}: tensor {name!r} is truncated")
        arr = np.frombuffer(raw, dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
        tensors[name] = arr.astype(t["dtype"])
    return header, tensors
