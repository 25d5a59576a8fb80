"""Few-shot reference selection: which k normal images a k-shot method may look at.

The official AdaptCLIP protocol
-------------------------------
From gaobb/AdaptCLIP: ``scripts/test_adaptclip.sh`` runs shots 1, 2 and 4 with seeds
10, 20 and 30 each (shot 0 with seed 10 only) and reports mean +- std over the three seeds;
``dataset/dataset.py`` (``PromptDataset.__init__``) then picks the references of every class
independently:

1. the pool is ``meta["train"][class]``: the class's training list in meta.json order
   (sorted file names of ``train/good`` for MVTec AD, ``1cls.csv`` row order for VisA);
2. the global torch generator is re-seeded with ``torch.manual_seed(seed)`` *for each class*,
   so a class's picks depend only on (seed, k, pool size), not on the other classes;
3. ``torch.randint(0, len(pool), (k,))`` draws k indices **with replacement** on the CPU
   generator, and the references are ``pool[i]`` in the drawn order (a repeated index
   gives a repeated reference; it happens, e.g. for small pools).

:func:`sample_references` makes exactly these calls on its own ``torch.Generator`` seeded the
same way (identical to the re-seeded global CPU generator, without touching global state),
so on the same ordered pool it returns the same files. ``replace=False`` is offered for
k distinct references (``torch.randperm`` prefix; not the official protocol).

Official quirks *not* reproduced: when meta.json's ``"train"`` is empty, PromptDataset
samples from the whole ``"test"`` list (anomalous images included) and leaves the picks in
the test set. Here, a class without training normals draws from its *normal* test images
(same random calls over that list) and removes the picks from the test set
(:func:`few_shot_split`, which warns when it does so). This applies to the folder dataset
and to VisA without ``split_csv/1cls.csv``.

(Multi-view Real-IAD, where the official code seeds per view, is not handled.)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from clipad.data.sample import NORMAL, AnomalyDataset, Sample
from clipad.errors import ClipadError, ClipadWarning

__all__ = ["few_shot_split", "sample_references"]


def sample_references(
    pool: Sequence[Sample | Path | str],
    k: int,
    seed: int,
    *,
    replace: bool = True,
) -> list[Path]:
    """Pick ``k`` reference images from ``pool`` as the official AdaptCLIP test code does.

    Args:
        pool: the normal training images of one class, in dataset order (e.g.
            ``dataset.train_normals("bottle")``); the order decides the picks.
        k: number of references (shots); 0 gives ``[]``.
        seed: the protocol seed (10, 20 or 30 in the papers' tables).
        replace: True (default, official) draws indices with replacement via
            ``torch.randint``; False draws ``k`` distinct ones via ``torch.randperm``.

    Returns:
        ``k`` image paths, in drawn order.

    Raises:
        ClipadError: negative k, empty pool, or ``k > len(pool)`` without replacement.
    """
    if k < 0:
        raise ClipadError(f"number of reference shots must be >= 0, got {k}")
    if k == 0:
        return []
    paths = [item.image_path if isinstance(item, Sample) else Path(item) for item in pool]
    if not paths:
        raise ClipadError(f"cannot draw {k} reference image(s): the pool of normal images is empty")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if replace:
        indices = torch.randint(0, len(paths), (k,), generator=generator)
    else:
        if k > len(paths):
            raise ClipadError(f"cannot draw {k} distinct reference images from a pool of {len(paths)}")
        indices = torch.randperm(len(paths), generator=generator)[:k]
    return [paths[int(i)] for i in indices]


def few_shot_split(
    dataset: AnomalyDataset,
    class_name: str,
    k: int,
    seed: int,
    *,
    replace: bool = True,
) -> tuple[list[Path], AnomalyDataset]:
    """The references and the test set of one class for a k-shot evaluation.

    With training normals for the class, references come from them
    (:func:`sample_references`) and the test set is the class's test split unchanged. Without
    (folder dataset, VisA without split file, meta.json with an empty ``"train"``), references
    come from the class's normal test images and are removed from the returned test set, so
    no image is both a reference and a query; a warning says so.

    Args:
        dataset: the whole index.
        class_name: the class.
        k: shots (0 gives no references and the full test split).
        seed: protocol seed.
        replace: see :func:`sample_references`.

    Returns:
        ``(references, test)``: ``k`` paths and an :class:`AnomalyDataset` of test samples.

    Raises:
        UnknownNameError: the class is not in the dataset.
        ClipadError: no normal image to draw from.

    Warns:
        ClipadWarning: ``k`` is larger than the pool of normal images (references repeat; the
        message says how many distinct ones were used), or the test split was drawn from.
    """
    samples = dataset.for_class(class_name)
    test = samples.filter(split="test")
    if k == 0:
        return [], test
    pool = samples.filter(split="train", label=NORMAL)
    if len(pool):
        references = sample_references(pool, k, seed, replace=replace)
        if k > len(pool):  # drawn with replacement: some repeat, and the user may not know the pool is small
            warnings.warn(
                f"class {class_name!r} of {dataset.name}: {k} shots asked but it has only {len(pool)} normal "
                f"training image(s); {len(set(references))} distinct image(s) used as its {k} references",
                ClipadWarning,
                stacklevel=2,
            )
        return references, test
    pool = test.filter(label=NORMAL)
    if not len(pool):
        raise ClipadError(
            f"class {class_name!r} of {dataset.name}: no normal image (train or test) to draw "
            f"{k} reference(s) from"
        )
    references = sample_references(pool, k, seed, replace=replace)
    picked = set(references)
    warnings.warn(
        f"class {class_name!r} of {dataset.name} has no training split: {len(picked)} reference "
        f"image(s) drawn from its {len(pool)} normal test images and removed from the test set"
        + (f" ({k} shots asked: the pool is smaller, so some references repeat)" if k > len(pool) else ""),
        ClipadWarning,
        stacklevel=2,
    )
    return references, AnomalyDataset(
        (s for s in test if s.image_path not in picked), name=dataset.name, root=dataset.root
    )
