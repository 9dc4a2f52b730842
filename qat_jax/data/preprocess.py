"""Image decoding, augmentation and normalisation (numpy + PIL, no TensorFlow).

All randomness comes from :func:`uniforms`, a counter-based generator keyed by
``(seed, epoch, example_index)``: an example's augmentation does not depend on the batch it
lands in, the number of processes, the number of grain workers or on resuming.

Per-example functions work on uint8 ``[H, W, C]`` images; :meth:`Preprocessor.normalize` turns a
uint8 batch ``[..., S, S, C]`` into float32 ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib

import numpy as np

__all__ = ["AUGMENTATIONS", "PNG_SIGNATURE", "Preprocessor", "uniforms", "decode_image"]

AUGMENTATIONS = ("none", "crop_flip", "rrc_flip")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: np.ndarray, index: np.ndarray, num: int) -> np.ndarray:
    """Deterministic uniform [0, 1) draws, float64 ``[len(index), num]``.

    Draw ``k`` of example ``index[i]`` in ``epoch[i]`` is a pure function of
    ``(seed, epoch[i], index[i], k)``.
    """
    epoch = np.asarray(epoch, np.uint64).reshape(-1, 1)
    index = np.asarray(index, np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        key = _mix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) + _GOLDEN)
        key = _mix64(key ^ (epoch + _GOLDEN))
        key = _mix64(key ^ (index * _GOLDEN + np.uint64(1)))
        ctr = np.arange(num, dtype=np.uint64).reshape(1, -1)
        bits = _mix64(key + (ctr + np.uint64(1)) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG file


def _decode_simple_png(data: bytes, channels: int) -> np.ndarray | None:
    """Fast path for 8-bit grey/RGB non-interlaced PNGs whose rows all use filter 0.

    That is what :func:`qat_jax.data.preparation.encode_png` writes. Returns None for anything else
    (the caller falls back to PIL).
    """
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    c = {0: 1, 2: 3}.get(color)
    if depth != 8 or interlace != 0 or c != channels:
        return None
    pos, idat = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        if tag == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif tag == b"IEND":
            break
        pos += 12 + length
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error:
        return None
    stride = 1 + w * c
    if len(raw) != h * stride:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(h, stride)
    if rows[:, 0].any():
        return None
    return rows[:, 1:].reshape(h, w, c)


def decode_image(value, channels: int) -> np.ndarray:
    """Decodes encoded image bytes (PNG/JPEG) or passes arrays through; uint8 ``[H, W, C]``."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        return value
    fast = _decode_simple_png(value, channels)
    if fast is not None:
        return fast
    from PIL import Image

    with Image.open(io.BytesIO(value)) as img:
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr


def _pil_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes uint8 ``[H, W, C]`` to ``size = (H', W')`` with bicubic interpolation."""
    from PIL import Image

    if img.shape[:2] == size:
        return img
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    out = np.asarray(pil.resize((size[1], size[0]), Image.BICUBIC))
    return out[..., None] if out.ndim == 2 else out


def fit_to_size(img: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads (centred) and/or centre-crops uint8 ``[H, W, C]`` to ``[size, size, C]``.

    This is how 28x28 Fashion-MNIST becomes 32x32: 2 zero pixels on each side (zero is the
    images' background colour, so normalisation treats padding like background).
    """
    h, w, c = img.shape
    if h > size:
        top = (h - size) // 2
        img = img[top : top + size]
    if w > size:
        left = (w - size) // 2
        img = img[:, left : left + size]
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    out = np.zeros((size, size, c), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def resize_center_crop(img: np.ndarray, size: int, crop_frac: float) -> np.ndarray:
    """ImageNet eval: resize the shorter side to ``round(size / crop_frac)``, centre crop."""
    h, w = img.shape[:2]
    short = max(size, int(round(size / crop_frac)))
    if h <= w:
        new = (short, max(short, int(round(w * short / h))))
    else:
        new = (max(short, int(round(h * short / w))), short)
    img = _pil_resize(img, new)
    return fit_to_size(img, size)


_RRC_ATTEMPTS = 10
RRC_DRAWS = 4 * _RRC_ATTEMPTS + 1


def random_resized_crop(
    img: np.ndarray,
    size: int,
    u: np.ndarray,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style random-resized crop of uint8 ``[H, W, C]`` to ``[size, size, C]``.

    ``u`` holds at least ``4 * 10`` uniform draws (10 attempts; falls back to a centre crop
    with the aspect ratio clamped to ``ratio``).
    """
    h, w = img.shape[:2]
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for a in range(_RRC_ATTEMPTS):
        u0, u1, u2, u3 = u[4 * a : 4 * a + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u0)
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u1)
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u2 * (h - ch + 1)), h - ch)
            left = min(int(u3 * (w - cw + 1)), w - cw)
            return _pil_resize(img[top : top + ch, left : left + cw], (size, size))
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return _pil_resize(img[top : top + ch, left : left + cw], (size, size))


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Per-dataset preprocessing (picklable, so it can run in grain worker processes).

    Attributes:
      image_size: output side S (images are ``[S, S, C]``).
      channels: C.
      augment: ``'none'``, ``'crop_flip'`` (pad 4 + random SxS crop + horizontal flip) or
        ``'rrc_flip'`` (random-resized crop + horizontal flip).
      mean, std: per-channel constants on the [0, 1] scale.
      eval_resize: variable-size images (ImageNet): eval = resize + centre crop; train with
        ``augment != 'rrc_flip'`` starts from the same resize + centre crop.
      crop_frac: ImageNet eval crop fraction.
      pad: padding of ``crop_flip``.
    """

    image_size: int
    channels: int
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_resize: bool = False
    crop_frac: float = 0.875
    pad: int = 4

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")

    @property
    def num_draws(self) -> int:
        """Uniform draws used per training example."""
        return RRC_DRAWS if self.augment == "rrc_flip" else 3

    def base(self, img: np.ndarray) -> np.ndarray:
        """Deterministic resize/pad/crop to ``[S, S, C]`` (the eval transform)."""
        if self.eval_resize:
            return resize_center_crop(img, self.image_size, self.crop_frac)
        return fit_to_size(img, self.image_size)

    def train(self, img: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Training transform of one uint8 ``[H, W, C]`` image given its draws ``u``."""
        s = self.image_size
        if self.augment == "rrc_flip":
            out = random_resized_crop(img, s, u)
            return out[:, ::-1] if u[-1] < 0.5 else out
        out = self.base(img)
        if self.augment == "crop_flip":
            p = self.pad
            padded = np.zeros((s + 2 * p, s + 2 * p, out.shape[-1]), np.uint8)
            padded[p : p + s, p : p + s] = out
            top = min(int(u[0] * (2 * p + 1)), 2 * p)
            left = min(int(u[1] * (2 * p + 1)), 2 * p)
            out = padded[top : top + s, left : left + s]
            if u[2] < 0.5:
                out = out[:, ::-1]
        return out

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[..., S, S, C]`` -> float32 ``(x / 255 - mean) / std``."""
        std = np.asarray(self.std, np.float32)
        scale = 1.0 / (255.0 * std)
        shift = np.asarray(self.mean, np.float32) / std
        return images.astype(np.float32) * scale - shift
