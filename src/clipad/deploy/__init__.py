"""Deployment: calibrated pass/fail decisions (:mod:`.calibrate`), export and runtimes.

Importing this package imports nothing heavy (no torch): a runtime that needs no torch can be
imported through it. Names are resolved from their modules on first access (PEP 562); add a
module's public names to ``_LAZY``.

>>> from clipad.deploy import calibrate                                     # doctest: +SKIP
>>> report = calibrate(det, normal_images, fpr=0.01)   # thresholds kept in det, saved by det.save
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it, imported on first access
_LAZY: dict[str, str] = {
    "calibrate": "calibrate",
    "Calibration": "calibrate",
    "conformal_threshold": "calibrate",
    "fpr_upper_bound": "calibrate",
    "images_needed": "calibrate",
    "OnnxDetector": "runtime",  # onnxruntime, numpy and Pillow only: no torch
    "OnnxPrediction": "runtime",
    "export_onnx": "export",
    "export_and_verify": "export",
}

__all__ = ["Calibration", "OnnxDetector", "OnnxPrediction", "calibrate", "conformal_threshold", "export_and_verify",
           "export_onnx", "fpr_upper_bound", "images_needed"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
