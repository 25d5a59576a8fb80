"""MuSc (ICLR 2024): zero-shot anomaly detection by mutual scoring of a class's unlabeled test
images (transductive: ``predict`` scores the given set of images against each other).

:mod:`.model` holds the method; importing this package registers it.
"""

from typing import Any

from . import model
from .model import MuSc

__all__ = ["MuSc"]


def __getattr__(name: str) -> Any:
    return getattr(model, name)
