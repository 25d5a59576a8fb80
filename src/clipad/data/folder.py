"""Folder dataset: your own images, sorted into normal and abnormal directories.

::

    root/<normal dir>/**.png        (one or more; label 0)
    root/<abnormal dir>/**.png      (zero or more; label 1, defect type = the directory as given)
    root/<mask dir>/**.png          (optional; matched to abnormal images by file stem,
                                     ``<stem>.png`` or ``<stem>_mask.png``)

Directory arguments are relative to ``root`` (absolute ones are taken as they are), as the
CLI passes them (``--root R --normal-dir good --abnormal-dir bad --mask-dir masks``, each
repeatable). Without a mask directory only image metrics can run. There is no training split:
few-shot references are drawn from the normal images and removed from the test set
(:func:`clipad.data.sampling.few_shot_split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clipad.data._checks import EXTENSIONS_TEXT, mask_key, require_dir, warn_missing_masks, warn_orphan_masks
from clipad.data.sample import ANOMALOUS, NORMAL, AnomalyDataset, Sample
from clipad.errors import ClipadError
from clipad.data.images import list_images

__all__ = ["folder_dataset"]

PathArg = str | Path


def folder_dataset(
    root: PathArg,
    normal_dirs: PathArg | Sequence[PathArg] = (),
    abnormal_dirs: PathArg | Sequence[PathArg] = (),
    mask_dirs: PathArg | Sequence[PathArg] = (),
    class_name: str | None = None,
) -> AnomalyDataset:
    """Index images sorted into normal / abnormal directories.

    Args:
        root: base directory of the other arguments.
        normal_dirs: directories of normal images (searched recursively).
        abnormal_dirs: directories of anomalous images (searched recursively).
        mask_dirs: directories of masks for the anomalous images; files inside them are
            never taken as images even if they lie under a normal/abnormal directory.
        class_name: the category name used in text prompts; default the root's folder name.

    Returns:
        Normal then abnormal samples, all ``split="test"``, each directory sorted.

    Raises:
        ClipadError: missing root or directory, no directory given, a directory without
            images, an image that is both normal and abnormal.

    Warns:
        abnormal images without a mask (when mask directories are given); masks matching no
        abnormal image; masks matching several files ambiguously.
    """
    root = require_dir(Path(root), "folder dataset root", "a directory holding the normal/abnormal folders")
    normal = [_dir(root, d, "normal") for d in _as_list(normal_dirs)]
    abnormal = [_dir(root, d, "abnormal") for d in _as_list(abnormal_dirs)]
    masks = [_dir(root, d, "mask") for d in _as_list(mask_dirs)]
    if not normal and not abnormal:
        raise ClipadError(f"folder dataset '{root}': give at least one normal or abnormal directory")
    name = class_name or root.resolve().name

    mask_roots = [m.resolve() for m in masks]
    samples: list[Sample] = []
    seen: dict[Path, str] = {}
    for kind, dirs in (("normal", normal), ("abnormal", abnormal)):
        for directory in dirs:
            images = [p for p in list_images(directory) if not _inside(p, mask_roots)]
            if not images:
                raise ClipadError(
                    f"{kind} directory '{directory}' contains no images (looked for {EXTENSIONS_TEXT})"
                )
            for path in images:
                key = path.resolve()
                if seen.get(key, kind) != kind:
                    raise ClipadError(f"image '{path}' is in both a normal and an abnormal directory")
                if key in seen:
                    continue  # listed twice (overlapping directories of the same kind)
                seen[key] = kind
                if kind == "normal":
                    samples.append(Sample(path, NORMAL, name, None, "good", "test"))
                else:
                    defect = str(directory.relative_to(root)) if directory.is_relative_to(root) else str(directory)
                    samples.append(Sample(path, ANOMALOUS, name, None, defect, "test"))

    if masks:
        samples = _pair_masks(samples, masks, name)
    return AnomalyDataset(samples, name=f"folder:{root}", root=root)


def _as_list(value: PathArg | Sequence[PathArg]) -> list[PathArg]:
    return [value] if isinstance(value, (str, Path)) else list(value)


def _dir(root: Path, value: PathArg, kind: str) -> Path:
    path = root / value
    return require_dir(path, f"{kind} directory", f"a folder of images (paths are relative to the root '{root}')")


def _inside(path: Path, parents: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(parent) for parent in parents)


def _pair_masks(samples: list[Sample], mask_dirs: list[Path], name: str) -> list[Sample]:
    by_key: dict[str, list[Path]] = {}
    for directory in mask_dirs:
        for mask in list_images(directory):
            by_key.setdefault(mask_key(mask), []).append(mask)
    used: set[Path] = set()
    normal_stems = {s.image_path.stem for s in samples if s.label == NORMAL}
    missing: list[Path] = []
    ambiguous: list[Path] = []
    paired: list[Sample] = []
    for sample in samples:
        if sample.label == NORMAL:
            paired.append(sample)
            continue
        candidates = by_key.get(sample.image_path.stem, [])
        if len(candidates) > 1:
            # Same stem in several mask folders (e.g. ground_truth/<defect>/000_mask.png):
            # the one in a folder named like the image's folder is the match.
            candidates = [c for c in candidates if c.parent.name == sample.image_path.parent.name]
        if len(candidates) == 1:
            used.add(candidates[0])
            paired.append(Sample(sample.image_path, ANOMALOUS, name, candidates[0], sample.defect_type, "test"))
        else:
            (ambiguous if candidates else missing).append(sample.image_path)
            paired.append(sample)
    where = f"folder dataset class {name!r}"
    warn_missing_masks(where, missing, "no '<stem>.png' or '<stem>_mask.png' in the mask directories")
    if ambiguous:
        warn_missing_masks(
            where, ambiguous, "several masks share the stem and none is in a folder named like the image's"
        )
    # A mask named like a normal image (an all-black mask saved for it) is not an orphan.
    orphans = [m for ms in by_key.values() for m in ms if m not in used and mask_key(m) not in normal_stems]
    warn_orphan_masks(where, sorted(orphans))
    return paired

