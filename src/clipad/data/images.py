"""Robust reading of input images and ground-truth masks.

Every image that enters clipad goes through :func:`load_image`, every ground-truth mask
through :func:`load_mask`, and every "files or folders" argument through :func:`list_images`.
They turn the many ways an image file can be unusual (16-bit, palette, CMYK, EXIF-rotated,
huge, tiny) into one thing (an 8-bit RGB ``PIL.Image`` or a boolean array), and the many ways
it can be broken into one exception, :class:`~clipad.errors.ImageReadError`, whose message
names the file and the reason, so a batch run can report it in one line and carry on.

Example::

    >>> from clipad.imageio import list_images, load_image
    >>> for path in list_images(["shots/", "extra.png"]):   # doctest: +SKIP
    ...     image = load_image(path)                          # RGB, 8 bits per channel
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipad.errors import ClipadError, ClipadWarning, ImageReadError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image", "load_mask"]

#: File suffixes (lower case, with the dot) that :func:`list_images` picks up in a directory.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)

PathLike = str | os.PathLike[str]

# Pillow modes holding one channel of 16-bit unsigned integers.
_UINT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

# Pillow checks its decompression-bomb limit against one process-wide setting
# (PIL.Image.MAX_IMAGE_PIXELS), with no per-call override. A read with its own max_pixels switches
# that setting off while it runs (its own check, from the header, replaces Pillow's), under this
# lock, which a read with Pillow's limit also holds while opening, so it never sees it off.
_PILLOW_LIMIT = threading.Lock()

# How a limit is raised, in both of clipad's vocabularies: the message may reach a terminal
# through an evaluation's worker process, where nothing knows which front end is in use.
_RAISE_LIMIT = (
    "if the file is trusted, raise the limit (command line: --max-image-pixels MP; Python: the "
    "max_pixels=N argument of clipad.data.images.load_image, clipad.data.make_loader or clipad.eval.run.run)"
)


def list_images(
    dir_or_paths: PathLike | Iterable[PathLike], *, skipped: list[Path] | None = None
) -> list[Path]:
    """Expand a path or a list of paths into image files.

    Directories are searched recursively for files whose suffix is in
    :data:`IMAGE_EXTENSIONS` (case-insensitively: ``.PNG`` and ``.JPG`` count), sorted by
    their path components. Hidden files (name starting with ``.``, e.g. macOS ``._x.png``
    resource forks that look like images but are not) and hidden directories are skipped.
    Files named explicitly are kept as given, whatever their suffix, so that a bad file
    yields a clear read error later instead of silently vanishing from the run (an animated
    GIF named explicitly is read, first frame).

    The extension list stays fixed rather than "whatever Pillow opens": dataset layouts list
    their folders with this function, and their file sets (which the few-shot protocols index
    into) must not change with the Pillow version or with stray files. Callers that show
    results to people pass ``skipped`` and say what was left out.

    Args:
        dir_or_paths: one path, or an iterable of paths, to files or directories.
        skipped: if given, the non-hidden files found in directories whose suffix is not in
            :data:`IMAGE_EXTENSIONS` are appended to it, sorted like the result.

    Returns:
        The files, explicit ones in the order given, each directory's files in sorted order
        at the position of that directory. An empty directory contributes nothing; callers
        that need at least one image check for an empty result.

    Raises:
        ClipadError: a path does not exist.
    """
    if isinstance(dir_or_paths, (str, os.PathLike)):
        items: list[PathLike] = [dir_or_paths]
    else:
        items = list(dir_or_paths)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(_images_under(path, skipped))
        elif path.exists():
            files.append(path)
        else:
            raise ClipadError(f"path '{path}' does not exist (expected an image file or a directory)")
    return files


def _images_under(directory: Path, skipped: list[Path] | None = None) -> list[Path]:
    found: list[Path] = []
    other: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
            else:
                other.append(Path(dirpath) / name)
    if skipped is not None:
        skipped.extend(sorted(other, key=lambda p: p.parts))
    # Sorting by components (not by the joined string) keeps a folder's files together;
    # within one folder it is plain Python string order, the order `sorted(os.listdir())`
    # gives, which the official few-shot protocols index into.
    return sorted(found, key=lambda p: p.parts)


def load_image(path: PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Read an image file as 8-bit RGB, upright.

    Conversions:

    - grayscale (``1``, ``L``, ``LA``) is replicated to three channels;
    - alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is dropped, keeping the stored
      colour of transparent pixels rather than compositing onto a background: this is what
      ``Image.convert("RGB")`` in the official CLIP preprocessing does, so scores match;
    - palette (``P``) images are expanded through their palette;
    - 16-bit integers (``I;16*``, and ``I`` whose values fit in 16 bits, as 16-bit PNG and
      TIFF read) are scaled by the dtype range, ``v / 257`` rounded, so 65535 -> 255 and
      32896 -> 128; other ``I`` images and 32-bit float (``F``) images outside [0, 1] are
      min-max scaled to 0..255, floats inside [0, 1] are multiplied by 255;
    - CMYK (e.g. print-workflow JPEGs) is converted to RGB by Pillow;
    - the EXIF orientation tag is applied, so the result has the displayed size
      (a 40x30 file with orientation 6 comes back 30x40).

    The whole file is decoded here (Pillow otherwise decodes lazily), so a truncated or
    corrupt file fails now, with its name, instead of deep inside a batch. Truncated images
    are never silently accepted (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone), and an
    image over the size limit is reported as an error, never decoded.

    The size limit (decompression bombs: a small file can declare a gigapixel image): by default
    Pillow's, which refuses more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179 MP; an
    8000x8000 image is well inside it) and warns above it; ``max_pixels=N`` replaces it by
    clipad's own check of ``width * height <= N`` from the file's header, before decoding, for
    this read only (lower or higher than Pillow's, whatever ``PIL.Image.MAX_IMAGE_PIXELS`` says).

    Args:
        path: the image file.
        max_pixels: largest accepted ``width * height``; None = Pillow's limit.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``, detached from the file (no handle stays open).

    Raises:
        ImageReadError: missing file, directory, empty file, not an image, truncated or
            corrupt data, image too large, or a pixel mode that cannot be converted.
    """
    image = _read_pixels(path, max_pixels)
    try:
        return _to_rgb(image)
    except (ValueError, OSError) as exc:
        raise ImageReadError(str(path), f"cannot convert pixel mode {image.mode!r} to RGB ({exc})") from exc


def load_mask(
    path: PathLike,
    size: tuple[int, int] | None = None,
    *,
    threshold: float | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read a ground-truth mask as a boolean array (True = anomalous pixel).

    Any mode is accepted; colour masks are reduced to luminance (``convert("L")``, as the
    official AnomalyCLIP/AdaptCLIP loaders do). With ``R`` the maximum of the pixel type
    (255 for 8-bit, 65535 for 16-bit, 1.0 for float):

    - values only in {0, R}: the usual binary mask, True where the value is R;
    - otherwise, with ``threshold=None`` (the default):

      * if no pixel exceeds R/2 the file is a *label mask* (0 = background, small positive
        labels = defects; e.g. the raw VisA masks, whose anomalies are stored as 1, 2, ...),
        and every non-zero pixel is anomalous. Reading such a file at R/2 would give an
        empty mask, i.e. every defect silently lost. A mask with exactly two values
        {0, v} is taken as binary without a warning; more levels warn once for the file;
      * else the mask is binarised at 0.5 of the range (``> 127`` for 8-bit) with a warning
        (``"non-binary mask ... binarised at 0.5"``), which is right for anti-aliased or
        JPEG-compressed 0/255 masks;
    - ``threshold=t`` forces ``value > t * R`` (``t=0.0`` reproduces the official
      ``mask > 0``).

    If ``size`` is given and differs from the mask's size, the mask is resized with nearest
    neighbour (which keeps it binary) and a warning names both sizes.

    A mask's own EXIF orientation, if it has one, is applied as for images (a mask that kept
    its image's metadata is then upright like the image; masks without EXIF are unaffected).

    Args:
        path: the mask file.
        size: ``(H, W)`` of the image the mask belongs to, or None to keep the mask's size.
        threshold: fraction of the value range above which a pixel is anomalous, or None
            for the rule above.
        max_pixels: size limit, as for :func:`load_image`.

    Returns:
        ``np.ndarray`` of dtype bool and shape ``[H, W]``.

    Raises:
        ImageReadError: the file cannot be read (same reasons as :func:`load_image`).
    """
    image = _read_pixels(path, max_pixels)
    values, full_range = _mask_values(image)
    mask = _binarise(values, full_range, threshold, str(path))
    if size is not None:
        height, width = int(size[0]), int(size[1])
        if mask.shape != (height, width):
            warnings.warn(
                f"mask '{path}' is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{width}x{height}; resized with nearest neighbour",
                ClipadWarning,
                stacklevel=2,
            )
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (width, height), Image.Resampling.NEAREST
            )
            mask = np.asarray(resized) > 127
    return mask


# --------------------------------------------------------------------------- reading


def _read_pixels(path: PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open ``path``, decode all of its pixels and close the file; errors as ImageReadError.
    ``max_pixels``: clipad's own size limit, None = Pillow's (see :func:`load_image`)."""
    name = str(path)
    p = Path(path)
    if p.is_dir():
        raise ImageReadError(name, "is a directory, not an image file")
    try:
        nbytes = p.stat().st_size
    except FileNotFoundError as exc:
        raise ImageReadError(name, "no such file") from exc
    except OSError as exc:
        raise ImageReadError(name, f"cannot access the file ({exc.strerror or exc})") from exc
    if nbytes == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    try:
        if max_pixels is None:
            with _PILLOW_LIMIT:  # Pillow checks the declared size while opening
                image = Image.open(p)
            with image:
                return _decode(image, name)
        with _PILLOW_LIMIT:
            pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(p) as image:
                    width, height = image.size
                    if width * height > max_pixels:
                        raise ImageReadError(
                            name, f"image too large: {width}x{height} pixels ({width * height / 1e6:.3g} MP) is over "
                            f"the limit of {max_pixels:,} pixels ({max_pixels / 1e6:g} MP); {_RAISE_LIMIT}",
                        )
                    return _decode(image, name)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            name, f"image too large ({exc}): over Pillow's decompression-bomb limit, twice "
            f"PIL.Image.MAX_IMAGE_PIXELS; {_RAISE_LIMIT}",
        ) from exc
    except UnidentifiedImageError as exc:
        reason = "not an image file (cannot identify format)"
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            reason += f"; its '{p.suffix}' extension suggests a corrupt header"
        raise ImageReadError(name, reason) from exc
    except PermissionError as exc:
        raise ImageReadError(name, "permission denied") from exc
    except MemoryError as exc:
        raise ImageReadError(name, "not enough memory to decode the image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports bad pixel data through several exception types depending on the
        # codec (OSError for truncated JPEG/PNG, SyntaxError for broken PNG chunks, ...).
        raise ImageReadError(
            name, f"truncated or corrupt image data: {exc}; the file is {nbytes} bytes"
        ) from exc


def _decode(image: Image.Image, name: str) -> Image.Image:
    image.load()
    # Orientation is read from the original: later conversions may drop the EXIF block.
    return _apply_orientation(image, name)


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - a malformed EXIF block must not lose the pixels
        warnings.warn(f"image '{name}': ignoring unreadable EXIF orientation ({exc})", ClipadWarning, stacklevel=3)
        oriented = None
    # exif_transpose returns a copy (or None in some Pillow versions); copy() detaches the
    # pixels from the file object that the `with` block is about to close.
    return image.copy() if oriented is None or oriented is image else oriented


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _UINT16_MODES or mode in {"I", "F"}:
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA applies the palette's transparency entries consistently (and
        # avoids Pillow's warning about byte transparency); the alpha is then dropped.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale one channel of 16-bit, 32-bit integer or float pixels to uint8 ``[H, W]``."""
    values = values.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if mode in _UINT16_MODES or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0  # 65535 / 257 == 255 exactly: the full 16-bit range maps onto 8 bits
    elif mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- masks


def _mask_values(image: Image.Image) -> tuple[np.ndarray, float]:
    """One channel of mask values ``[H, W]`` and the maximum of their pixel type."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image).astype(np.uint8), 1.0
    if mode in _UINT16_MODES:
        return np.asarray(image).astype(np.int64), 65535.0
    if mode == "I":
        values = np.asarray(image).astype(np.int64)
        high = int(values.max()) if values.size else 0
        return values, 65535.0 if high <= 65535 else float(high)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        high = float(values.max()) if values.size else 0.0
        return values, 1.0 if high <= 1.0 else high
    if mode != "L":
        image = image.convert("L")
    return np.asarray(image), 255.0


def _binarise(values: np.ndarray, full_range: float, threshold: float | None, name: str) -> np.ndarray:
    if threshold is not None:
        return values > threshold * full_range
    levels = np.unique(values)
    if np.all((levels == 0) | (levels == full_range)):
        return values == full_range
    half = 0.5 * full_range
    if levels.max() <= half:
        if levels.size > 2:
            warnings.warn(
                f"mask '{name}' has {levels.size} levels, all at most {levels.max():g} of "
                f"{full_range:g}: read as a label mask, every non-zero pixel is anomalous",
                ClipadWarning,
                stacklevel=3,
            )
        return values != 0
    warnings.warn(
        f"non-binary mask '{name}' ({levels.size} distinct values in 0..{full_range:g}); "
        "binarised at 0.5 of the range",
        ClipadWarning,
        stacklevel=3,
    )
    return values > half
