"""Datasets: cheap indexes of image paths and labels, a batch loader, few-shot references.

Layouts (one module each): MVTec AD (:func:`mvtec_dataset`), VisA (:func:`visa_dataset`),
the official AnomalyCLIP/AdaptCLIP ``meta.json`` (:func:`meta_dataset`) and plain folders
(:func:`folder_dataset`); :func:`create_dataset` picks one by name. Each returns an
:class:`AnomalyDataset` of :class:`Sample` records without opening any image; pixels are read
by :class:`SampleLoader` / :func:`make_loader`, which set unreadable files aside.

Example::

    >>> from clipad.data import create_dataset, few_shot_split, make_loader   # doctest: +SKIP
    >>> ds = create_dataset("mvtec", "/data/mvtec")
    >>> refs, test = few_shot_split(ds, "bottle", k=4, seed=10)
    >>> for batch in make_loader(test, batch_size=8): ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and readers
    from clipad.data.factory import create_dataset, list_datasets
    from clipad.data.folder import folder_dataset
    from clipad.data.loading import (
        Batch,
        LoadedSample,
        LoadFailure,
        SampleLoader,
        collate_samples,
        make_loader,
    )
    from clipad.data.meta import meta_dataset
    from clipad.data.mvtec import mvtec_dataset
    from clipad.data.sample import ANOMALOUS, NORMAL, AnomalyDataset, Sample
    from clipad.data.sampling import few_shot_split, sample_references
    from clipad.data.visa import visa_dataset

#: public name -> its module, imported on first access: the package itself imports nothing, so
#: ``clipad.data.images`` (Pillow and numpy only) serves the ONNX runtime without torch
_LAZY = {
    **dict.fromkeys(("create_dataset", "list_datasets"), "factory"),
    "folder_dataset": "folder",
    **dict.fromkeys(("Batch", "LoadedSample", "LoadFailure", "SampleLoader", "collate_samples", "make_loader"), "loading"),
    "meta_dataset": "meta",
    "mvtec_dataset": "mvtec",
    **dict.fromkeys(("ANOMALOUS", "NORMAL", "AnomalyDataset", "Sample"), "sample"),
    **dict.fromkeys(("few_shot_split", "sample_references"), "sampling"),
    "visa_dataset": "visa",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ANOMALOUS",
    "NORMAL",
    "AnomalyDataset",
    "Batch",
    "LoadFailure",
    "LoadedSample",
    "Sample",
    "SampleLoader",
    "collate_samples",
    "create_dataset",
    "few_shot_split",
    "folder_dataset",
    "list_datasets",
    "make_loader",
    "meta_dataset",
    "mvtec_dataset",
    "sample_references",
    "visa_dataset",
]
