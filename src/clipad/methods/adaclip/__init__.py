"""AdaCLIP (ECCV 2024): hybrid static + dynamic learnable prompts in both CLIP towers.

:mod:`.model` holds the method; importing this package registers it.
"""

from . import model  # noqa: F401  (registers "adaclip")
from .model import AdaCLIP
from .options import AdaCLIPOptions

__all__ = ["AdaCLIP", "AdaCLIPOptions"]
