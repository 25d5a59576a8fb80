"""TokenCLIP: orthogonal textual subspaces with optimal-transport token assignment.

:mod:`.model` holds the method; importing this package registers it. Other names of
:mod:`.model` stay reachable here (``clipad.methods.tokenclip.<name>``) as before the move into a folder.
"""

from typing import Any

from . import model
from .model import TokenCLIP

__all__ = ["TokenCLIP"]


def __getattr__(name: str) -> Any:
    return getattr(model, name)
