"""One source image -> what a .beton stores for it, from one read of the file and one decode, which is the check.

The judge of the stored pixels is FFCV's own writer (``RGBImageField.encode``, ffcv 1.0.2): it takes a PIL-decoded
array, shrinks it with OpenCV's ``INTER_AREA`` to ``floor(side * max_resolution / longer side)`` when it is larger,
and stores it raw or as an OpenCV JPEG at ``jpeg_quality``, 'proportion' drawing per image from the global
``np.random``. This module stores the same pixels for less work:

- the file is read once: its bytes are checked, decoded and, when kept, stored;
- JPEGs decode with libjpeg-turbo through OpenCV straight into an array: the same pixels as PIL's decode (bit for
  bit), without PIL's conversion and copy into numpy (half the decode's cost again);
- the shrink is FFCV's ``INTER_AREA`` run on float32, which OpenCV 5 does in 0.6-0.8x the time of its uint8
  path and rounds to the same bytes;
- a giant JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT (``IMREAD_REDUCED_*``) and is shrunk with
  ``INTER_AREA`` from there, but only where the shrink that follows is large enough (8x after 1/2, 16x after 1/4
  or 1/8) to keep >= 40 dB PSNR against FFCV's full-size shrink. The DCT's low-pass is sharper than INTER_AREA's
  box: on real photos, a 1/2-scale decode shrunk 1.2-4.5x more lands 29-45 dB from FFCV's pixels, so at max side
  256 only images above 4096 px take this path (tests/test_convert.py measures the bar);
- a JPEG that already fits and is drawn for JPEG storage is stored as it is, its own bytes: no re-encode, no
  second generation of JPEG loss;
- the proportion draw is a hash of the image's path within the split, not a global RNG, so the same folder gives
  the same .beton whatever the worker count.

Everything else (PNG, CMYK, 16-bit, palette, alpha, a JPEG without its end marker) goes through PIL and is
normalised to 8-bit RGB. ``eval_crop`` mode stores what timm's eval transform makes of the original image instead
(resize the shorter side to ``img_size / crop_pct``, centre crop), raw, so FFCV evaluation scores the standard
number.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image

JPEG_END = b"\xff\xd9"
HTML = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")
# (DCT scale, OpenCV flag, the least INTER_AREA shrink that must follow it). Measured on five real photos: every
# one stayed >= 40 dB PSNR from FFCV's full-size shrink from a 6.4x shrink on after 1/2, 12.8x after 1/4 and 7.5x
# after 1/8; shorter shrinks fell to 24-39 dB. The flag sets the scale; IMREAD_COLOR_RGB makes it colour.
REDUCED = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8, 16), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4, 16),
           (2, cv2.IMREAD_REDUCED_GRAYSCALE_2, 8))


@dataclass(frozen=True)
class Stored:
    """One image as the .beton holds it: ``mode`` 'jpg' or 'raw' (FFCV's IMAGE_MODES) and its payload."""

    mode: str
    height: int
    width: int
    payload: bytes


@dataclass(frozen=True)
class EvalCrop:
    """timm's eval geometry: the shorter side resized to ``img_size / crop_pct``, then a centre ``img_size`` crop."""

    img_size: int
    crop_pct: float
    interpolation: str


def stored_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """(width, height) as FFCV's resizer stores it: the sides scaled and floored, unchanged when it fits."""
    original = np.array([width, height])
    ratio = max_resolution / original.max()
    return (width, height) if ratio >= 1 else tuple(int(s) for s in (ratio * original).astype(int))


def draws_jpeg(key: str, probability: float) -> bool:
    """The 'proportion' choice for the image at ``key`` (its path within the split): a uniform draw from its hash,
    so it is the same in any process, at any position, with any worker count."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < probability


def encode(path: str, key: str, *, max_resolution: int, write_mode: str, compress_probability: float,
           jpeg_quality: int, min_side: int, eval_crop: EvalCrop | None = None) -> Stored | str:
    """What the .beton stores for the image at ``path``, or why it cannot be used (one line)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            return "empty file (0 bytes)"
        if data[:64].lstrip().lower().startswith(HTML):
            return "HTML/XML text, not an image (a failed download?)"
        if eval_crop is not None:
            pixels = _timm_eval_crop(data, eval_crop)
            return Stored("raw", *pixels.shape[:2], pixels.tobytes())
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            size = stored_size(*im.size, max_resolution)
            if min(size) < min_side:
                return (f"too small: {im.width}x{im.height} is stored at {size[0]}x{size[1]} (max side "
                        f"{max_resolution}), below --min-side {min_side}, which the loaders' crops need")
            pixels, as_is = decode(im, data, size)
    except Exception as e:  # PIL and OpenCV raise many types for corrupt data; each one means: skip this file
        return f"undecodable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    jpg = write_mode == "jpg" or (write_mode == "proportion" and draws_jpeg(key, compress_probability))
    if not jpg:
        return Stored("raw", *pixels.shape[:2], pixels.tobytes())
    if as_is and len(data) <= pixels.nbytes:  # a JPEG bloated by metadata beyond its raw size is re-encoded
        return Stored("jpg", *pixels.shape[:2], data)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        return "undecodable: OpenCV could not JPEG-encode its pixels"
    return Stored("jpg", *pixels.shape[:2], jpeg.tobytes())


def decode(im: Image.Image, data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """``data`` (opened as ``im``) as HxWx3 uint8 RGB of ``size``, and whether ``data`` itself may be stored as is:
    a complete 8-bit RGB or grayscale JPEG of exactly that size, which FFCV's libjpeg-turbo decoder reads."""
    plain_jpeg = im.format == "JPEG" and im.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(JPEG_END)
    pixels = _decode_jpeg(data, im.size, size) if plain_jpeg else None
    as_is = pixels is not None and size == im.size
    if pixels is None:  # anything else, or a JPEG OpenCV refuses: PIL decodes it or says why not
        scale = dct_scale(im.size, size) if im.format == "JPEG" else 1
        if scale > 1:
            im.draft("RGB", (-(-im.width // scale), -(-im.height // scale)))  # the largest scale that still covers it
        im.load()
        pixels = np.asarray(to_rgb(im))
    if pixels.shape[1::-1] != size:  # FFCV's own INTER_AREA shrink, run on float32: the same pixels, faster
        pixels = cv2.convertScaleAbs(cv2.resize(np.float32(pixels), size, interpolation=cv2.INTER_AREA))
    return pixels, as_is


def dct_scale(original: tuple[int, int], size: tuple[int, int]) -> int:
    """The largest DCT downscale (8, 4, 2, else 1) of an ``original`` (width, height) JPEG that leaves a large
    enough INTER_AREA shrink to ``size`` (see REDUCED)."""
    (w, h), (tw, th) = original, size
    return next((k for k, _, shrink in REDUCED if -(-w // k) >= shrink * tw and -(-h // k) >= shrink * th), 1)


def _decode_jpeg(data: bytes, original: tuple[int, int], size: tuple[int, int]) -> np.ndarray | None:
    """Decode at ``dct_scale``; None if OpenCV cannot decode it."""
    (w, h), scale = original, dct_scale(original, size)
    flag = next((f for k, f, _ in REDUCED if k == scale), 0)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None or pixels.shape != (-(-h // scale), -(-w // scale), 3):
        return None
    return pixels


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16/32-bit grayscale rescaled (not clipped to white), alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray((a / hi * 255).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _timm_eval_crop(data: bytes, crop: EvalCrop) -> np.ndarray:
    """HxWx3 uint8: what timm's eval transform makes of the image, read as timm's ImageFolder reads it (PIL,
    ``convert('RGB')``); timm's prefetcher form of the transform ends in the uint8 pixels, before normalisation."""
    with Image.open(io.BytesIO(data)) as im:
        return _eval_transform(crop)(im.convert("RGB")).permute(1, 2, 0).numpy()


@cache
def _eval_transform(crop: EvalCrop):
    from timm.data import create_transform

    return create_transform(crop.img_size, is_training=False, crop_pct=crop.crop_pct,
                            interpolation=crop.interpolation, use_prefetcher=True)
