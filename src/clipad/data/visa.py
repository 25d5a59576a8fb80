"""VisA layout.

::

    root/<class>/Data/Images/Normal/*.JPG
    root/<class>/Data/Images/Anomaly/*.JPG
    root/<class>/Data/Masks/Anomaly/<stem>.png
    root/split_csv/1cls.csv          header: object,split,label,image,mask

The split file that ships with VisA defines the train/test split: ``split`` is ``train`` or
``test``, ``label`` is ``normal`` or ``anomaly``, ``image``/``mask`` are paths relative to
``root`` (``mask`` empty for normal rows). Samples keep the file's row order within each
class, because the official meta.json (AnomalyCLIP's ``generate_dataset_json/visa.py``,
AdaptCLIP's ``dataset/visa.py``) lists them in that order and the few-shot sampler indexes
into it.

Without the split file the directories are scanned instead, with a warning: every image is
then a test image, and few-shot references are drawn from (and removed from) the normal test
images (:func:`clipad.data.sampling.few_shot_split`).

Raw VisA masks store defects as small labels (1, 2, ...), not 255; :func:`clipad.imageio.load_mask`
reads them as "non-zero = anomalous", as the official code does.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path

from clipad.data._checks import require_dir, warn_missing_masks, warn_orphan_masks
from clipad.data.sample import ANOMALOUS, NORMAL, AnomalyDataset, Sample
from clipad.errors import ClipadError, ClipadWarning
from clipad.data.images import list_images

__all__ = ["visa_dataset"]

_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS}
_LAYOUT = "<root>/<class>/Data/Images/{Normal,Anomaly}/ and <root>/split_csv/1cls.csv (VisA layout)"


def visa_dataset(
    root: str | Path,
    classes: Sequence[str] | None = None,
    split_csv: str | Path | None = None,
) -> AnomalyDataset:
    """Index a VisA tree.

    Args:
        root: the dataset root (holding ``split_csv/`` and one directory per class).
        classes: class names to index; None = all classes of the split file (or all class
            directories with ``Data/Images`` when scanning).
        split_csv: the split file; None = ``root/split_csv/1cls.csv`` if it exists, else a
            directory scan. A file given explicitly must exist.

    Raises:
        ClipadError: missing root, class directory or explicit split file; a malformed split
            file (header, label or split value, naming the line); no images.

    Warns:
        the split file is missing (directory scan); anomalous images without a mask; masks
        without an image (scan only).
    """
    root = require_dir(Path(root), "VisA root", _LAYOUT)
    if split_csv is not None:
        csv_path = Path(split_csv)
        if not csv_path.is_file():
            raise ClipadError(f"VisA split file '{csv_path}' does not exist")
        return _from_csv(root, csv_path, classes)
    csv_path = root / "split_csv" / "1cls.csv"
    if csv_path.is_file():
        return _from_csv(root, csv_path, classes)
    warnings.warn(
        f"VisA split file '{csv_path}' not found; indexing by directory scan: every image is a "
        "test image and there is no training split (few-shot references are then drawn from "
        "the normal images and removed from the test set)",
        ClipadWarning,
        stacklevel=2,
    )
    return _from_scan(root, classes)


def _from_csv(root: Path, csv_path: Path, classes: Sequence[str] | None) -> AnomalyDataset:
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing_cols = [c for c in _COLUMNS if c not in header]
        if missing_cols:
            raise ClipadError(
                f"VisA split file '{csv_path}': missing column(s) {', '.join(missing_cols)}; "
                f"expected header '{','.join(_COLUMNS)}', found '{','.join(header)}'"
            )
        reader.fieldnames = header
        rows = [(reader.line_num, row) for row in reader]

    by_class: dict[str, list[Sample]] = {}
    no_mask: dict[str, list[Path]] = {}
    for line, row in rows:
        cls = (row["object"] or "").strip()
        split = (row["split"] or "").strip()
        label_text = (row["label"] or "").strip()
        image = (row["image"] or "").strip()
        if not any((cls, split, label_text, image)):
            continue  # blank line
        where = f"VisA split file '{csv_path}', line {line}"
        if label_text not in _LABELS:
            raise ClipadError(f"{where}: label {label_text!r} is neither 'normal' nor 'anomaly'")
        if split not in ("train", "test"):
            raise ClipadError(f"{where}: split {split!r} is neither 'train' nor 'test'")
        if not cls or not image:
            raise ClipadError(f"{where}: empty 'object' or 'image' field")
        label = _LABELS[label_text]
        mask_path: Path | None = None
        if label == ANOMALOUS:
            mask_text = (row["mask"] or "").strip()
            candidate = root / mask_text if mask_text else None
            # Checking anomalous masks only: a few stat calls, and a missing mask would
            # otherwise surface as an all-normal ground truth deep inside the metrics.
            if candidate is not None and candidate.is_file():
                mask_path = candidate
            else:
                no_mask.setdefault(cls, []).append(root / image)
        by_class.setdefault(cls, []).append(
            Sample(root / image, label, cls, mask_path, "good" if label == NORMAL else "anomaly", split)
        )

    if not by_class:
        raise ClipadError(f"VisA split file '{csv_path}' lists no images")
    selected = list(by_class) if classes is None else list(classes)
    unknown = [c for c in selected if c not in by_class]
    if unknown:
        raise ClipadError(
            f"VisA split file '{csv_path}' has no class {', '.join(map(repr, unknown))}; "
            f"it lists: {', '.join(by_class)}"
        )
    samples: list[Sample] = []
    for cls in selected:
        require_dir(root / cls, f"class directory of {cls!r} (listed in '{csv_path}')", _LAYOUT)
        warn_missing_masks(f"VisA class {cls!r}", no_mask.get(cls, []), "mask column empty or file missing")
        # Train before test, each in row order (the official meta.json keeps this order).
        samples.extend(s for s in by_class[cls] if s.split == "train")
        samples.extend(s for s in by_class[cls] if s.split == "test")
    return AnomalyDataset(samples, name=f"visa:{root}", root=root)


def _from_scan(root: Path, classes: Sequence[str] | None) -> AnomalyDataset:
    if classes is None:
        class_dirs = sorted(d for d in root.iterdir() if (d / "Data" / "Images").is_dir())
        if not class_dirs:
            raise ClipadError(f"no VisA class under '{root}': expected {_LAYOUT}")
    else:
        class_dirs = [require_dir(root / c, f"class directory of {c!r}", _LAYOUT) for c in classes]
    samples: list[Sample] = []
    for class_dir in class_dirs:
        cls = class_dir.name
        images_dir = require_dir(
            class_dir / "Data" / "Images", f"image directory of class {cls!r}", "Normal/ and Anomaly/ folders"
        )
        normals = list_images(images_dir / "Normal") if (images_dir / "Normal").is_dir() else []
        anomalies = list_images(images_dir / "Anomaly") if (images_dir / "Anomaly").is_dir() else []
        if not normals and not anomalies:
            raise ClipadError(
                f"VisA class {cls!r}: no images in '{images_dir}/Normal' or '{images_dir}/Anomaly'"
            )
        samples.extend(Sample(p, NORMAL, cls, None, "good", "test") for p in normals)
        mask_dir = class_dir / "Data" / "Masks" / "Anomaly"
        masks = {m.stem: m for m in list_images(mask_dir)} if mask_dir.is_dir() else {}
        missing: list[Path] = []
        for path in anomalies:
            mask = masks.pop(path.stem, None)
            if mask is None:
                missing.append(path)
            samples.append(Sample(path, ANOMALOUS, cls, mask, "anomaly", "test"))
        warn_missing_masks(f"VisA class {cls!r}", missing, f"expected '{mask_dir}/<stem>.png'")
        warn_orphan_masks(f"VisA class {cls!r}", sorted(masks.values()))
    return AnomalyDataset(samples, name=f"visa:{root}", root=root)
