"""AnomalyDINO (Damm et al., WACV 2025): few-shot anomaly detection by nearest-neighbour distances of
DINOv2 patch features to those of a few normal references.

:mod:`.model` holds the method (importing this package registers it as ``anomalydino``),
:mod:`.options` its options, :mod:`.masking` the official PCA foreground mask, :mod:`.rotation`
the official reference rotation.
"""

from . import model
from .model import AnomalyDINO
from .options import AnomalyDINOOptions

__all__ = ["AnomalyDINO", "AnomalyDINOOptions", "model"]
