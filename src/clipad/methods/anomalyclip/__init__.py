"""AnomalyCLIP (ICLR 2024): object-agnostic learned prompts.

:mod:`.model` holds the method; importing this package registers it. Other names of
:mod:`.model` stay reachable here (``clipad.methods.anomalyclip.<name>``) as before the move into a folder.
"""

from typing import Any

from . import model
from .model import AnomalyCLIP

__all__ = ["AnomalyCLIP"]


def __getattr__(name: str) -> Any:
    return getattr(model, name)
