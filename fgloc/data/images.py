"""Robust image loading: any file PIL reads -> ``uint8 (H, W, 3)`` RGB.

Handles what real photo collections contain: grayscale (L, LA, I;16, I, F), palette (P),
RGBA / LA (composited on white), CMYK, 16-bit PNG/TIFF (scaled to 8 bit), EXIF orientation,
and truncated JPEGs (an error, not a half-grey image). Every failure is an :class:`ImageError`
whose message names the file.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A decompression bomb (> ~180 megapixels) is refused rather than exhausting memory.
Image.MAX_IMAGE_PIXELS = 180_000_000


class ImageError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        elif arr.size and arr.max() > 255:
            arr = arr / max(float(arr.max()), 1.0) * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    out = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if out.ndim != 3 or out.shape[-1] != 3 or out.shape[0] < 1 or out.shape[1] < 1:
        raise ImageError(f"{name}: decoded to unexpected shape {out.shape}")
    return out


def _open(source, name: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                return _to_rgb(img, name)
    except ImageError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``uint8 (H, W, 3)`` RGB.

    Raises:
      ImageError: missing file, a directory, an empty or corrupt file, or not an image.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageError(f"{name}: file not found")
    if os.path.isdir(name):
        raise ImageError(f"{name}: is a directory, not an image")
    if os.path.getsize(name) == 0:
        raise ImageError(f"{name}: empty file")
    return _open(name, name)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) as ``uint8 (H, W, 3)`` RGB."""
    if not data:
        raise ImageError(f"{name}: empty image data")
    return _open(io.BytesIO(data), name)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the file header (cheap; EXIF rotation applied)."""
    name = os.fspath(path)
    try:
        with Image.open(name) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
