"""clipad: zero- and few-shot visual anomaly detection with a frozen CLIP.

>>> import clipad, torch
>>> det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu")
>>> pred = det.predict(torch.rand(2, 3, 240, 240), class_name="bottle")
>>> pred.image_scores.shape, pred.anomaly_maps.shape
(torch.Size([2]), torch.Size([2, 240, 240]))
"""

from . import _compat
from .api import create_detector, load_detector
from .backbones import list_backbones
from .errors import ClipadError, ClipadWarning, ImageReadError, InvalidValueError, UnknownNameError, WeightsNotFound
from .methods import Detector, Prediction, list_methods
from .version import __version__

_compat.install()

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
