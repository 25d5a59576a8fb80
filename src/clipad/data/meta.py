"""The ``meta.json`` index of the official AnomalyCLIP and AdaptCLIP code.

Schema (written by ``generate_dataset_json/{mvtec,visa,...}.py`` in zqhang/AnomalyCLIP and
``dataset/{mvtec,visa}.py`` in gaobb/AdaptCLIP, read by their ``dataset.py``)::

    {
      "train": {"<class>": [<entry>, ...], ...},     # may be {} (datasets without a train split)
      "test":  {"<class>": [<entry>, ...], ...}
    }
    <entry> = {
      "img_path":    "bottle/test/broken_large/000.png",   # relative to the root
      "mask_path":   "bottle/ground_truth/broken_large/000_mask.png",  # "" for normal images
      "cls_name":    "bottle",
      "specie_name": "broken_large",   # defect type; "good" for MVTec normals, "" for VisA
      "anomaly":     1,                # 0 normal, 1 anomalous
      "view_id":     "C1"              # optional, multi-view sets (Real-IAD) only
    }

List order is kept: the official few-shot sampler indexes into ``train[<class>]``.

Differences from the official readers, on purpose:

- an anomalous entry whose ``mask_path`` is empty or names a directory is read by the
  official code as an all-normal mask ("just for classification"), which pulls its pixel
  metrics down; here its mask is unknown (``mask_path=None``), it counts for image metrics
  only, and a warning lists such entries;
- a ``mask_path`` naming a missing file is a warning (same treatment) instead of a crash
  in the middle of an evaluation.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipad.data._checks import require_dir, warn_missing_masks
from clipad.data.sample import ANOMALOUS, NORMAL, AnomalyDataset, Sample
from clipad.errors import ClipadError, ClipadWarning

__all__ = ["meta_dataset"]

_SCHEMA_HINT = '{"train": {class: [entries]}, "test": {class: [entries]}} (AnomalyCLIP/AdaptCLIP meta.json)'


def meta_dataset(
    root: str | Path,
    meta_path: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> AnomalyDataset:
    """Index a dataset described by an official-format ``meta.json``.

    Args:
        root: the directory that ``img_path`` and ``mask_path`` are relative to.
        meta_path: the JSON file; None = ``root/meta.json``.
        classes: class names (keys of the split dicts) to index; None = all, test keys first.

    Raises:
        ClipadError: missing root or meta file, invalid JSON (with line and column), an entry
            without ``img_path`` or with an ``anomaly`` other than 0/1 (naming split, class
            and position), no test entries, an unknown class.

    Warns:
        anomalous entries without a usable mask; multi-view entries (``view_id``), whose
        per-view few-shot protocol is not reproduced.
    """
    root = require_dir(Path(root), "meta.json root", "the directory the meta.json paths are relative to")
    path = Path(meta_path) if meta_path is not None else root / "meta.json"
    if not path.is_file():
        raise ClipadError(f"meta file '{path}' does not exist; expected {_SCHEMA_HINT}")
    try:
        with path.open(encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ClipadError(f"meta file '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    except UnicodeDecodeError as exc:
        raise ClipadError(f"meta file '{path}' is not UTF-8 text ({exc.reason})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("test"), dict):
        raise ClipadError(f"meta file '{path}' has no \"test\" object; expected {_SCHEMA_HINT}")
    train = meta.get("train") or {}
    if not isinstance(train, dict):
        raise ClipadError(f"meta file '{path}': \"train\" is not an object; expected {_SCHEMA_HINT}")
    splits = {"train": train, "test": meta["test"]}

    available = list(dict.fromkeys([*splits["test"], *splits["train"]]))
    selected = available if classes is None else list(classes)
    unknown = [c for c in selected if c not in available]
    if unknown:
        raise ClipadError(
            f"meta file '{path}' has no class {', '.join(map(repr, unknown))}; it lists: {', '.join(available)}"
        )

    samples: list[Sample] = []
    no_mask: list[Path] = []
    multi_view = False
    for cls in selected:
        for split in ("train", "test"):
            entries = splits[split].get(cls, [])
            if not isinstance(entries, list):
                raise ClipadError(f"meta file '{path}': {split}[{cls!r}] is not a list of entries")
            for i, entry in enumerate(entries):
                sample = _entry_to_sample(entry, root, cls, split, f"meta file '{path}', {split}[{cls!r}][{i}]")
                if sample.label == ANOMALOUS and sample.mask_path is None:
                    no_mask.append(sample.image_path)
                multi_view = multi_view or "view_id" in entry
                samples.append(sample)
    if not any(s.split == "test" for s in samples):
        raise ClipadError(f"meta file '{path}' has no test entries for {', '.join(selected) or 'any class'}")
    warn_missing_masks(f"meta file '{path}'", no_mask, "mask_path empty, a directory, or missing")
    if multi_view:
        warnings.warn(
            f"meta file '{path}' has multi-view entries (view_id); views are indexed as plain "
            "images and the official per-view few-shot sampling is not reproduced",
            ClipadWarning,
            stacklevel=2,
        )
    return AnomalyDataset(samples, name=f"meta:{path}", root=root)


def _entry_to_sample(entry: Any, root: Path, cls: str, split: str, where: str) -> Sample:
    if not isinstance(entry, dict):
        raise ClipadError(f"{where} is not an object with img_path, mask_path, cls_name, specie_name, anomaly")
    img_path = entry.get("img_path")
    if not isinstance(img_path, str) or not img_path:
        raise ClipadError(f"{where} has no img_path")
    anomaly = entry.get("anomaly")
    if isinstance(anomaly, bool) or anomaly not in (0, 1):
        raise ClipadError(f"{where}: anomaly is {anomaly!r}, expected 0 or 1")
    label = int(anomaly)
    mask_path: Path | None = None
    mask_text = entry.get("mask_path") or ""
    if label == ANOMALOUS and isinstance(mask_text, str) and mask_text:
        candidate = root / mask_text
        if candidate.is_file():
            mask_path = candidate
    class_name = entry.get("cls_name") or cls
    defect = entry.get("specie_name") or ("good" if label == NORMAL else "anomaly")
    return Sample(root / img_path, label, str(class_name), mask_path, str(defect), split)
