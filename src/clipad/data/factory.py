"""Creating a dataset index by layout name, as the CLI's ``--dataset`` does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipad.data.folder import folder_dataset
from clipad.data.meta import meta_dataset
from clipad.data.mvtec import mvtec_dataset
from clipad.data.sample import AnomalyDataset
from clipad.data.visa import visa_dataset
from clipad.errors import UnknownNameError

__all__ = ["create_dataset", "list_datasets"]

_LAYOUTS: dict[str, Callable[..., AnomalyDataset]] = {
    "folder": folder_dataset,
    "meta": meta_dataset,
    "mvtec": mvtec_dataset,
    "visa": visa_dataset,
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`create_dataset`."""
    return sorted(_LAYOUTS)


def create_dataset(name: str, root: str | Path, **options: Any) -> AnomalyDataset:
    """Index the dataset at ``root`` with the layout ``name``.

    ``options`` go to the layout function: ``classes`` (mvtec, visa, meta), ``split_csv``
    (visa), ``meta_path`` (meta), ``normal_dirs``/``abnormal_dirs``/``mask_dirs``/
    ``class_name`` (folder).

    Raises:
        UnknownNameError: ``name`` is not a layout (the message lists them).
    """
    try:
        build = _LAYOUTS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown dataset layout {name!r}; choose one of: {', '.join(list_datasets())}"
        ) from None
    return build(root, **options)
