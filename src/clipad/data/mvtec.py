"""MVTec AD layout.

::

    root/<class>/train/good/*.png                   normal training images (few-shot pool)
    root/<class>/test/good/*.png                    normal test images
    root/<class>/test/<defect>/*.png                anomalous test images
    root/<class>/ground_truth/<defect>/<stem>_mask.png

Masks are paired with images by file name (``000.png`` <-> ``000_mask.png``; ``000.png`` in
the mask folder is accepted too), not by sorted position as the official meta.json
generators do: for the real dataset both give the same pairs, and by name a missing or
extra file cannot shift every later pair by one.

``root`` may also be a single class directory (one that has ``test/``); the class is then
named after it. MVTec AD-like datasets with the same layout (MPDD, BTAD after renaming,
MVTec LOCO test folders) load the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from clipad.data._checks import mask_key, require_dir, summarise_paths, warn_missing_masks, warn_orphan_masks
from clipad.data.sample import ANOMALOUS, NORMAL, AnomalyDataset, Sample
from clipad.errors import ClipadError, ClipadWarning
from clipad.data.images import list_images

__all__ = ["mvtec_dataset"]

_GOOD = "good"
_LAYOUT = "<root>/<class>/test/<defect>/*.png (MVTec AD layout)"


def mvtec_dataset(root: str | Path, classes: Sequence[str] | None = None) -> AnomalyDataset:
    """Index an MVTec AD tree.

    Args:
        root: the dataset root (holding one directory per class), or one class directory.
        classes: class names to index; None = every directory of ``root`` that has ``test/``,
            in sorted order.

    Returns:
        Train normals (``split="train"``, sorted by file name: the order the official
        meta.json lists them and the few-shot sampler indexes into) followed by test samples
        (defects in sorted order, ``"good"`` = normal), class by class.

    Raises:
        ClipadError: missing root or class directory, no class found, a class without test
            images.

    Warns:
        anomalous images without a mask (kept, label 1, ``mask_path=None``); masks without an
        image (ignored); empty defect directories; a class without ``train/good``.
    """
    root = require_dir(Path(root), "MVTec AD root", _LAYOUT)
    if (root / "test").is_dir():
        class_dirs = [root]
        if classes is not None and list(classes) != [root.name]:
            raise ClipadError(
                f"MVTec AD root '{root}' is the single class '{root.name}'; cannot select {list(classes)}"
            )
    elif classes is None:
        class_dirs = sorted(d for d in root.iterdir() if (d / "test").is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise ClipadError(f"no MVTec AD class under '{root}': expected {_LAYOUT}")
    else:
        class_dirs = []
        for name in classes:
            class_dir = require_dir(root / name, f"class directory of {name!r}", _LAYOUT)
            require_dir(class_dir / "test", f"test directory of class {name!r}", "test/<defect>/ folders")
            class_dirs.append(class_dir)
    samples: list[Sample] = []
    for class_dir in class_dirs:
        samples.extend(_index_class(class_dir))
    return AnomalyDataset(samples, name=f"mvtec:{root}", root=root)


def _index_class(class_dir: Path) -> list[Sample]:
    name = class_dir.name
    samples = [
        Sample(path, NORMAL, name, None, _GOOD, "train") for path in _train_normals(class_dir)
    ]
    test_dir = class_dir / "test"
    gt_dir = class_dir / "ground_truth"
    loose = [p for p in test_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        warnings.warn(
            f"class {name!r}: {len(loose)} file(s) directly in '{test_dir}' are ignored "
            f"(images belong in test/<defect>/): {summarise_paths(loose)}",
            ClipadWarning,
            stacklevel=3,
        )
    defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    n_test = 0
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        images = list_images(defect_dir)
        if not images:
            warnings.warn(f"class {name!r}: defect directory '{defect_dir}' holds no images", ClipadWarning, stacklevel=3)
            continue
        n_test += len(images)
        if defect == _GOOD:
            samples.extend(Sample(path, NORMAL, name, None, _GOOD, "test") for path in images)
            continue
        samples.extend(_pair_masks(name, defect, images, gt_dir / defect))
    if n_test == 0:
        raise ClipadError(
            f"class {name!r}: no test images under '{test_dir}'; expected test/<defect>/*.png "
            "(with test/good/ for the normal ones)"
        )
    # Masks for defects that have no test folder at all (e.g. a renamed or deleted folder).
    if gt_dir.is_dir():
        tested = {d.name for d in defect_dirs}
        stray = [m for d in sorted(gt_dir.iterdir()) if d.is_dir() and d.name not in tested for m in list_images(d)]
        warn_orphan_masks(f"class {name!r}", stray)
    return samples


def _train_normals(class_dir: Path) -> list[Path]:
    good = class_dir / "train" / _GOOD
    if not good.is_dir():
        return []  # zero-shot copies often drop train/; few-shot sampling says so if needed
    images = list_images(good)
    if not images:
        warnings.warn(f"class {class_dir.name!r}: '{good}' holds no images (no few-shot pool)", ClipadWarning, stacklevel=4)
    return images


def _pair_masks(name: str, defect: str, images: list[Path], mask_dir: Path) -> list[Sample]:
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        for mask in list_images(mask_dir):
            # `<stem>_mask` wins over a plain `<stem>` file if both exist (the MVTec convention).
            key = mask_key(mask)
            if key not in masks or mask.stem.endswith("_mask"):
                masks[key] = mask
    used: set[Path] = set()
    samples: list[Sample] = []
    missing: list[Path] = []
    for path in images:
        mask = masks.get(path.stem)
        if mask is None:
            missing.append(path)
        else:
            used.add(mask)
        samples.append(Sample(path, ANOMALOUS, name, mask, defect, "test"))
    where = f"class {name!r}, defect {defect!r}"
    warn_missing_masks(where, missing, f"expected '{mask_dir}/<stem>_mask.png'")
    warn_orphan_masks(where, [m for m in masks.values() if m not in used])
    return samples
