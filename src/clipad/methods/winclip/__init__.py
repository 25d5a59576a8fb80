"""WinCLIP (CVPR 2023): prompt ensembles against window and patch embeddings; k-shot memory.

:mod:`.model` holds the method; importing this package registers it. Other names of
:mod:`.model` stay reachable here (``clipad.methods.winclip.<name>``) as before the move into a folder.
"""

from typing import Any

from . import model
from .model import WinCLIP

__all__ = ["WinCLIP"]


def __getattr__(name: str) -> Any:
    return getattr(model, name)
