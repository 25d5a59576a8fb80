"""AdaptCLIP (AAAI 2026): visual, textual and prompt-query adapters; 0- and k-shot.

:mod:`.model` holds the method; importing this package registers it. Other names of
:mod:`.model` stay reachable here (``clipad.methods.adaptclip.<name>``) as before the move into a folder.
"""

from typing import Any

from . import model
from .model import AdaptCLIP

__all__ = ["AdaptCLIP"]


def __getattr__(name: str) -> Any:
    return getattr(model, name)
