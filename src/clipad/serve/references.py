"""k-shot reference images per class, optionally kept on disk across restarts.

A class name comes from the network, so it never becomes a path as given: each class is
stored under :func:`class_dirname` (a slug of safe characters plus a hash of the exact name),
with the exact name in ``class.json`` inside. What is stored are the decoded images, re-encoded
as PNG, not model features: they stay valid when the server restarts with another method or
backbone, and reading them back needs no unpickling (there is no pickle anywhere here).

Layout::

    references_dir/
      bottle-3f2a9c1d2b7e/        class_dirname("bottle")
        class.json                {"class_name": "bottle", "shots": 2}
        000.png  001.png
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import unicodedata
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..errors import ClipadError, ClipadWarning, ImageReadError
from ..data.images import load_image

__all__ = ["MAX_CLASS_NAME", "check_class_name", "class_dirname", "delete", "load_all", "save"]

#: Longest accepted class name, in characters (names go into text prompts, not only into keys).
MAX_CLASS_NAME = 100

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def check_class_name(name: str) -> str:
    """Return ``name`` stripped of surrounding blanks, or raise ClipadError saying what is wrong."""
    stripped = name.strip()
    if not stripped:
        raise ClipadError("class name is empty")
    if len(stripped) > MAX_CLASS_NAME:
        raise ClipadError(f"class name is {len(stripped)} characters long; at most {MAX_CLASS_NAME} are accepted")
    if any(unicodedata.category(ch).startswith("C") for ch in stripped):
        raise ClipadError(f"class name {stripped!r} contains control or invisible characters")
    return stripped


def class_dirname(name: str) -> str:
    """A directory name for a class: ``[A-Za-z0-9_-]`` only, never ``.``/``..``, distinct per name.

    ``"bottle"`` -> ``"bottle-<12 hex>"``; ``"../../etc"`` -> ``"etc-<12 hex>"``.
    """
    slug = _UNSAFE.sub("_", name).strip("_")[:40] or "class"
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return f"{slug}-{digest}"


def save(root: Path, class_name: str, images: Sequence[Image.Image]) -> Path:
    """Write one class's references, replacing any earlier set of that class atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / class_dirname(class_name)
    staging = root / f".tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for i, image in enumerate(images):
            image.save(staging / f"{i:03d}.png", format="PNG")
        (staging / "class.json").write_text(json.dumps({"class_name": class_name, "shots": len(images)}))
        old = None
        if final.exists():
            old = root / f".old-{uuid.uuid4().hex}"
            final.rename(old)
        staging.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def delete(root: Path, class_name: str) -> bool:
    """Remove one class's stored references; True if there were any."""
    target = root / class_dirname(class_name)
    if target.is_dir():
        shutil.rmtree(target)
        return True
    return False


def load_all(root: Path) -> dict[str, list[Image.Image]]:
    """Every stored class and its images; unreadable entries are skipped with a warning."""
    found: dict[str, list[Image.Image]] = {}
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            meta = json.loads((entry / "class.json").read_text())
            name = check_class_name(str(meta["class_name"]))
            if class_dirname(name) != entry.name:
                raise ClipadError(f"its class.json names {name!r}, which belongs in '{class_dirname(name)}'")
            images = [load_image(p) for p in sorted(entry.glob("[0-9][0-9][0-9].png"))]
            if not images:
                raise ClipadError("it holds no images")
        except (OSError, ValueError, KeyError, TypeError, ClipadError, ImageReadError) as exc:
            warnings.warn(f"references directory '{entry}' skipped: {exc}", ClipadWarning, stacklevel=2)
            continue
        found[name] = images
    return found
