"""clipad: zero- and few-shot visual anomaly detection with a frozen CLIP.

>>> import clipad, torch
>>> det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu")
>>> pred = det.predict(torch.rand(2, 3, 240, 240), class_name="bottle")
>>> pred.image_scores.shape, pred.anomaly_maps.shape
(torch.Size([2]), torch.Size([2, 240, 240]))

``import clipad`` is light: the names that need torch (:func:`create_detector`, :class:`Detector`...)
are imported on first use (PEP 562), so ``clipad --version`` and ``clipad --help`` start at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _compat
from .errors import ClipadError, ClipadWarning, ImageReadError, InvalidValueError, UnknownNameError, WeightsNotFound
from .version import __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and readers
    from .api import create_detector, load_detector
    from .backbones import list_backbones
    from .methods import Detector, Prediction, list_methods

_compat.install()

#: public name -> the module that defines it, imported on first access (it imports torch)
_LAZY = {
    "create_detector": "api",
    "load_detector": "api",
    "list_backbones": "backbones",
    "Detector": "methods",
    "Prediction": "methods",
    "list_methods": "methods",
}
#: subpackages that ``import clipad`` used to bind as a side effect (``clipad.methods.get_method``):
#: still reachable as attributes, imported on first access
_SUBMODULES = ("api", "backbones", "checkpoint", "components", "data", "methods")

__all__ = [
    "ClipadError",
    "ClipadWarning",
    "Detector",
    "ImageReadError",
    "InvalidValueError",
    "Prediction",
    "UnknownNameError",
    "WeightsNotFound",
    "__version__",
    "create_detector",
    "list_backbones",
    "list_methods",
    "load_detector",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
