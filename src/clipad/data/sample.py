"""The dataset index: :class:`Sample` records and the :class:`AnomalyDataset` that holds them.

A dataset in clipad is a cheap list of file paths and labels. Building one reads directory
listings and split files but never opens an image; loading pixels is a separate step
(:mod:`clipad.data.loading`), so an evaluation can batch-load, and report unreadable files
one by one without losing the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from clipad.errors import UnknownNameError

__all__ = ["AnomalyDataset", "Sample", "NORMAL", "ANOMALOUS"]

NORMAL = 0
ANOMALOUS = 1


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image_path: the image file.
        label: 0 normal, 1 anomalous.
        class_name: the object/texture category, e.g. ``"bottle"``; the text prompts use it.
        mask_path: ground-truth mask of an anomalous image; None for normal images (their
            mask is all-normal by definition) and for anomalous images without a mask
            (unknown ground truth: such an image counts for image metrics only).
        defect_type: ``"good"`` for normal images, else the defect name where the layout has
            one (MVTec AD's ``test/<defect>``, meta.json's ``specie_name``, the folder
            dataset's abnormal directory) or ``"anomaly"``.
        split: ``"train"`` or ``"test"``; few-shot references come from ``"train"`` normals.
    """

    image_path: Path
    label: int
    class_name: str
    mask_path: Path | None = None
    defect_type: str = "good"
    split: str = "test"

    @property
    def is_anomalous(self) -> bool:
        return self.label == ANOMALOUS

    @property
    def has_pixel_truth(self) -> bool:
        """Whether pixel metrics can use this image: normal, or anomalous with a mask."""
        return self.label == NORMAL or self.mask_path is not None


class AnomalyDataset(Sequence[Sample]):
    """An ordered, immutable list of :class:`Sample` with filtering by class, split and label.

    Order matters: it is the order of the layout's own listing (sorted file names, split-file
    rows, meta.json lists), which the official few-shot protocols index into.

    Example::

        >>> ds = AnomalyDataset([Sample(Path("a.png"), 0, "bottle", split="train"),
        ...                      Sample(Path("b.png"), 1, "bottle")])
        >>> ds.classes, len(ds.filter(split="test"))
        (['bottle'], 1)
    """

    def __init__(self, samples: Iterable[Sample], name: str = "dataset", root: Path | None = None) -> None:
        self._samples: tuple[Sample, ...] = tuple(samples)
        self.name = name
        self.root = root

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> AnomalyDataset: ...
    def __getitem__(self, index: int | slice) -> Sample | AnomalyDataset:
        if isinstance(index, slice):
            return self._derive(self._samples[index])
        return self._samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __repr__(self) -> str:
        n_test = sum(s.split == "test" for s in self._samples)
        n_anom = sum(s.split == "test" and s.label == ANOMALOUS for s in self._samples)
        return (
            f"AnomalyDataset({self.name!r}, classes={len(self.classes)}, "
            f"train={len(self) - n_test}, test={n_test} ({n_anom} anomalous))"
        )

    @property
    def classes(self) -> list[str]:
        """Class names in order of first appearance."""
        return list(dict.fromkeys(s.class_name for s in self._samples))

    def filter(
        self,
        *,
        class_name: str | Iterable[str] | None = None,
        split: str | None = None,
        label: int | None = None,
    ) -> AnomalyDataset:
        """The samples matching every given criterion, in the same order.

        Raises:
            UnknownNameError: a requested class is not in the dataset (lists the ones that are).
        """
        samples: Iterable[Sample] = self._samples
        if class_name is not None:
            wanted = {class_name} if isinstance(class_name, str) else set(class_name)
            unknown = sorted(wanted.difference(self.classes))
            if unknown:
                raise UnknownNameError(
                    f"{self.name}: no class {', '.join(repr(c) for c in unknown)}; "
                    f"classes are: {', '.join(self.classes) or '(none)'}"
                )
            samples = [s for s in samples if s.class_name in wanted]
        if split is not None:
            samples = [s for s in samples if s.split == split]
        if label is not None:
            samples = [s for s in samples if s.label == label]
        return self._derive(samples)

    def for_class(self, class_name: str) -> AnomalyDataset:
        """Shorthand for ``filter(class_name=class_name)``."""
        return self.filter(class_name=class_name)

    def train_normals(self, class_name: str) -> AnomalyDataset:
        """Normal training images of one class, in index order (the few-shot reference pool)."""
        return self.filter(class_name=class_name, split="train", label=NORMAL)

    def _derive(self, samples: Iterable[Sample]) -> AnomalyDataset:
        return AnomalyDataset(samples, name=self.name, root=self.root)

