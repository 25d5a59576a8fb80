"""Methods: one folder each, registered by name. Importing this package registers them all.

A new method is a folder ``methods/<name>/`` (its model, options, converter and helpers) plus
one line below; see docs/architecture.md.
"""

from .base import Detector, LearnedDetector, LearnedOptions, Options, Prediction, Thresholds
from .registry import get_method, list_methods, register_method
from . import winclip  # noqa: F401  (registers "winclip")
from . import anoclip  # noqa: F401
from . import anomalyclip  # noqa: F401
from . import adaptclip  # noqa: F401
from . import tokenclip  # noqa: F401
from . import adaclip  # noqa: F401
from . import musc  # noqa: F401
from . import anomalydino  # noqa: F401

__all__ = ["Detector", "LearnedDetector", "LearnedOptions", "Options", "Prediction", "Thresholds", "get_method",
           "list_methods", "register_method"]
