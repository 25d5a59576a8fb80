"""Checks and warnings shared by the dataset layouts (paths that must exist, mask pairing)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from clipad.errors import ClipadError, ClipadWarning
from clipad.data.images import IMAGE_EXTENSIONS

MASK_SUFFIX = "_mask"
EXTENSIONS_TEXT = ", ".join(sorted(IMAGE_EXTENSIONS))


def summarise_paths(paths: Sequence[Path | str], limit: int = 5) -> str:
    """``"a.png, b.png, ... and 7 more"``: a bounded list of files for a one-line warning."""
    shown = ", ".join(str(p) for p in paths[:limit])
    rest = len(paths) - limit
    return shown + (f" and {rest} more" if rest > 0 else "")


def require_dir(path: Path, what: str, expected: str) -> Path:
    """``path`` if it is a directory, else a ClipadError naming it, ``what`` it is and ``expected``."""
    if not path.exists():
        raise ClipadError(f"{what} '{path}' does not exist; expected {expected}")
    if not path.is_dir():
        raise ClipadError(f"{what} '{path}' is not a directory; expected {expected}")
    return path


def mask_key(mask_path: Path) -> str:
    """The image stem a mask file belongs to: ``000_mask.png`` and ``000.png`` both give ``000``."""
    stem = mask_path.stem
    return stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem


def warn_missing_masks(where: str, images: Sequence[Path], expected: str) -> None:
    if images:
        warnings.warn(
            f"{where}: {len(images)} anomalous image(s) have no mask ({expected}); they count "
            f"for image metrics only and are left out of pixel metrics: {summarise_paths(images)}",
            ClipadWarning,
            stacklevel=3,
        )


def warn_orphan_masks(where: str, masks: Sequence[Path]) -> None:
    if masks:
        warnings.warn(
            f"{where}: {len(masks)} mask(s) match no anomalous image and are ignored: "
            f"{summarise_paths(masks)}",
            ClipadWarning,
            stacklevel=3,
        )
