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

__all__ = ["ImageTooLarge", "declared_size", "load_image_bytes", "map_png", "overlay_png", "png_base64"]

#: Default ceiling on width x height of an uploaded image (50 megapixels, about 150 MB as RGB).
DEFAULT_MAX_PIXELS = 50_000_000

#: Rows of an overlay blended at once: its float32 temporaries cost ~50 B/px, so a whole
#: 7000x7000 overlay would need ~2.5 GB; bands of about one megapixel need ~50 MB.
_BAND_PIXELS = 1_000_000


class ImageTooLarge(ImageReadError):
    """An upload whose declared pixel count is over the server's limit (answered with 413)."""


def _too_large(name: str, width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        name, f"image is {width}x{height} pixels ({width * height / 1e6:.1f} MP), over this server's per-image "
        f"limit of {max_pixels:,} pixels: send a smaller image, or start the server with a larger --max-image-pixels"
    )


def declared_size(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as the file's header declares it; no pixel is decoded.

    ``Image.open`` reads only the header, so this costs microseconds and no image memory
    whatever size the file claims: the server checks its pixel budgets with it before decoding.
    (The EXIF orientation may swap width and height later; the pixel count stays.)

    Raises:
        ImageTooLarge: over ``max_pixels`` (or over Pillow's decompression-bomb limit).
        ImageReadError: empty or not an image.
    """
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(name, f"image too large ({exc}); the per-image limit is {max_pixels:,} pixels (--max-image-pixels)") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(name, "not an image file (cannot identify format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise ImageReadError(name, f"truncated or corrupt image header: {exc}; the upload is {len(data)} bytes") from exc
    if width * height > max_pixels:
        raise _too_large(name, width, height, max_pixels)
    return width, height


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
                raise _too_large(name, width, height, max_pixels)
            image.load()
            oriented = _apply_orientation(image, name)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(name, f"image too large ({exc}); the per-image limit is {max_pixels:,} pixels (--max-image-pixels)") from exc
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
    """Heatmap over the image (colour range: the map's own min..max), as base64 PNG.

    Blended in bands of rows with the whole map's colour range: the same pixels as one
    :func:`clipad.eval.viz.overlay` call (every step is per pixel), at a fraction of the memory.
    """
    from ..eval.viz import overlay, value_range

    lo, hi = value_range(amap)
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    if rows >= height:
        return png_base64(Image.fromarray(overlay(image, amap, vmin=lo, vmax=hi)))
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        band = image.crop((0, top, width, bottom))
        out[top:bottom] = overlay(band, amap[top:bottom], vmin=lo, vmax=hi)
    return png_base64(Image.fromarray(out))


def map_png(amap: np.ndarray) -> tuple[str, float, float]:
    """Raw map as a 16-bit grayscale base64 PNG plus the (min, max) that 0 and 65535 stand for.

    ``value = min + png / 65535 * (max - min)`` recovers the map to 1.5e-5 of its range.
    """
    from ..eval.viz import value_range

    lo, hi = value_range(amap)  # the finite min / max, without a masked copy of the map
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    # One float copy worked on in place (the same values as the expression spelled out, without
    # its four temporaries: 16 B/px fewer on a map the size of the upload).
    q = np.nan_to_num(amap, nan=lo)
    q -= lo
    q *= scale
    np.rint(q, out=q)
    np.clip(q, 0, 65535, out=q)
    return png_base64(Image.fromarray(q.astype(np.uint16))), lo, hi
