"""Loading a dataset's pixels in batches, skipping unreadable files instead of stopping.

:class:`SampleLoader` is a ``torch.utils.data.Dataset`` over :class:`~clipad.data.Sample`
records: item ``i`` is a :class:`LoadedSample` (image + mask) or, when the image or its mask
cannot be read, a :class:`LoadFailure` carrying the path and reason. :func:`collate_samples`
turns a list of either into a :class:`Batch` whose ``failures`` the evaluation reports one
line each (``str(failure)``) and counts, while the rest of the batch goes on. Pass it as
``collate_fn`` to a ``DataLoader``, or use :func:`make_loader`.

Example::

    >>> loader = make_loader(dataset.filter(split="test"), batch_size=8)     # doctest: +SKIP
    >>> for batch in loader:                                                 # doctest: +SKIP
    ...     for failure in batch.failures:
    ...         print(failure)              # image 'x.png': truncated ...; skipped
    ...     pred = detector.predict(batch.images, class_name=...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipad.data.sample import NORMAL, Sample
from clipad.errors import ImageReadError
from clipad.data.images import load_image, load_mask

__all__ = ["Batch", "LoadFailure", "LoadedSample", "SampleLoader", "collate_samples", "make_loader"]


@dataclass
class LoadedSample:
    """One sample with its pixels.

    Attributes:
        index: position in the loader's sample list.
        sample: the index record.
        image: the RGB ``PIL.Image`` from :func:`~clipad.imageio.load_image`, or what
            ``transform`` made of it.
        mask: ``torch.bool [H, W]`` at the image's (upright) size; all False for normal
            images; None for an anomalous image without a mask (unknown: pixel metrics skip it).
    """

    index: int
    sample: Sample
    image: Any
    mask: torch.Tensor | None


@dataclass
class LoadFailure:
    """A sample that could not be loaded; ``str()`` is the one line to report."""

    index: int
    sample: Sample
    path: str
    reason: str

    def __str__(self) -> str:
        if self.path == str(self.sample.image_path):
            return f"image '{self.path}': {self.reason}; skipped"
        return f"mask '{self.path}' of image '{self.sample.image_path}': {self.reason}; image skipped"


@dataclass
class Batch:
    """A collated batch of the samples that loaded, plus the ones that did not.

    Attributes:
        indices: loader positions of the loaded samples.
        samples: their records.
        images: ``[B, ...]`` tensor when every image is a tensor of one shape (a transform
            made them so), else a list of B images.
        masks: B entries of ``torch.bool [H_i, W_i]`` or None (see :class:`LoadedSample`).
        failures: the samples of this batch that could not be read.
    """

    indices: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    images: torch.Tensor | list[Any] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    failures: list[LoadFailure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def pin_memory(self) -> Batch:
        """Page-locked image tensor, so the copy to a GPU can overlap compute (DataLoader's
        ``pin_memory=True`` calls this in its pinning thread)."""
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        return self


class SampleLoader(Dataset):
    """``torch`` dataset reading the images (and masks) of a list of samples.

    Args:
        samples: the records to load (an :class:`~clipad.data.AnomalyDataset` or any sequence).
        transform: applied to each RGB ``PIL.Image`` (e.g. to a ``[3, H, W]`` tensor); None
            keeps the PIL image, so a detector can apply its own preprocessing.
        load_masks: False skips mask files (image-level evaluation only; masks are None).
        max_pixels: size limit of images and masks (:func:`~clipad.data.images.load_image`);
            None = Pillow's. Held here, so worker processes get it whatever their start method.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Any] | None = None,
        load_masks: bool = True,
        max_pixels: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.load_masks = load_masks
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LoadedSample | LoadFailure:
        sample = self.samples[index]
        try:
            image = load_image(sample.image_path, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            return LoadFailure(index, sample, exc.path, exc.reason)
        mask: torch.Tensor | None = None
        if self.load_masks:
            size = (image.height, image.width)
            if sample.label == NORMAL:
                mask = torch.zeros(size, dtype=torch.bool)
            elif sample.mask_path is not None:
                try:
                    mask = torch.from_numpy(load_mask(sample.mask_path, size=size, max_pixels=self.max_pixels))
                except ImageReadError as exc:
                    return LoadFailure(index, sample, exc.path, exc.reason)
        return LoadedSample(index, sample, self.transform(image) if self.transform else image, mask)


def collate_samples(items: Sequence[LoadedSample | LoadFailure]) -> Batch:
    """Collate :class:`SampleLoader` items into a :class:`Batch`, setting failures aside."""
    batch = Batch()
    images: list[Any] = []
    for item in items:
        if isinstance(item, LoadFailure):
            batch.failures.append(item)
            continue
        batch.indices.append(item.index)
        batch.samples.append(item.sample)
        images.append(item.image)
        batch.masks.append(item.mask)
    if images and all(isinstance(x, torch.Tensor) for x in images) and len({x.shape for x in images}) == 1:
        batch.images = torch.stack(images)
    else:
        batch.images = images
    return batch


def make_loader(
    samples: Sequence[Sample],
    batch_size: int = 8,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    load_masks: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    max_pixels: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` of :class:`Batch` over ``samples`` in order (no shuffling); with
    ``num_workers`` > 0 images are decoded (and transformed) in worker processes while the
    caller computes; ``pin_memory`` pins collated image tensors for asynchronous GPU copies;
    ``max_pixels``: the size limit of every image and mask (None: Pillow's; see
    :func:`~clipad.data.images.load_image`)."""
    return DataLoader(
        SampleLoader(samples, transform=transform, load_masks=load_masks, max_pixels=max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
