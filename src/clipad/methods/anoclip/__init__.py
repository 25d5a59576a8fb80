"""AnoCLIP / AnoVL: value-value local tokens, domain-aware prompts, optional test-time adaptation.

:mod:`.model` holds the method; importing this package registers it. Other names of
:mod:`.model` stay reachable here (``clipad.methods.anoclip.<name>``) as before the move into a folder.
"""

from typing import Any

from . import model
from .model import AnoCLIP

__all__ = ["AnoCLIP"]


def __getattr__(name: str) -> Any:
    return getattr(model, name)
