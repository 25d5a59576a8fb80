"""Bytes in, bytes out: decoding uploaded images and encoding maps as PNG for HTTP answers.

Uploads get exactly the treatment files get in :func:`clipad.imageio.load_image` (RGB, 8 bits,
EXIF orientation applied, everything decoded up front), so a score from the server equals the
score ``clipad predict`` gives for the same file. What differs is where the bytes come from
and one more guard: the pixel count is checked from the header *before* decoding, because an
upload of a few kilobytes can declare a gigapixel image.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError

# Shared with the path-based reader on purpose: one definition of "an image as clipad sees it".
from ..data.images import _apply_orientation, _to_rgb

__all__ = ["ImageTooLarge", "load_image_bytes", "map_png", "overlay_png", "png_base64"]

#: Default ceiling on width x height of an uploaded image (50 megapixels, about 150 MB as RGB).
DEFAULT_MAX_PIXELS = 50_000_000


class ImageTooLarge(ImageReadError):
    """An upload whose declared pixel count is over the server's limit (answered with 413)."""


def load_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an uploaded file as 8-bit RGB, upright (the rules of :func:`clipad.imageio.load_image`).

    Args:
        data: the file's bytes.
        name: what to call it in error messages (the upload's file name).
        max_pixels: largest accepted ``width * height``, checked before decoding.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImageTooLarge: the image declares more than ``max_pixels`` pixels.
        ImageReadError: empty, not an image, truncated or corrupt.
    """
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    name, f"image is {width}x{height} pixels, over this server's limit of {max_pixels:,} pixels"
                )
            image.load()
            oriented = _apply_orientation(image, name)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(name, f"image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(name, "not an image file (cannot identify format)") from exc
    except MemoryError as exc:
        raise ImageReadError(name, "not enough memory to decode the image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise ImageReadError(name, f"truncated or corrupt image data: {exc}; the upload is {len(data)} bytes") from exc
    try:
        return _to_rgb(oriented)
    except (ValueError, OSError) as exc:
        raise ImageReadError(name, f"cannot convert pixel mode {oriented.mode!r} to RGB ({exc})") from exc


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: maps are re-encoded for every answer; level 6 costs ~3x the time for ~10% less.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_base64(image: Image.Image) -> str:
    """PNG file of ``image`` as base64 text (no ``data:`` prefix)."""
    return base64.b64encode(_png_bytes(image)).decode("ascii")


def overlay_png(image: Image.Image, amap: np.ndarray) -> str:
    """Heatmap over the image (colour range: the map's own min..max), as base64 PNG."""
    from ..eval.viz import overlay

    return png_base64(Image.fromarray(overlay(image, amap)))


def map_png(amap: np.ndarray) -> tuple[str, float, float]:
    """Raw map as a 16-bit grayscale base64 PNG plus the (min, max) that 0 and 65535 stand for.

    ``value = min + png / 65535 * (max - min)`` recovers the map to 1.5e-5 of its range.
    """
    finite = amap[np.isfinite(amap)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    q = np.clip(np.rint((np.nan_to_num(amap, nan=lo) - lo) * scale), 0, 65535).astype(np.uint16)
    return png_base64(Image.fromarray(q)), lo, hi
