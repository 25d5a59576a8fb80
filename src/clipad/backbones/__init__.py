"""Backbones: a frozen CLIP (open_clip) seen as a token stream, and what it is built from.

- :mod:`.clip`: :class:`Backbone`, :func:`create_backbone`, :func:`list_backbones` (``tiny`` included);
- :mod:`.weights`: where weights come from (a file, an open_clip tag, or random), offline errors;
- :mod:`.blocks`: the fused batch-first residual block;
- :mod:`.dualpath`: the value-value (V-V / DPAM) dual path, and the one place that turns each
  method's dual-path option into a start block;
- :mod:`.precision`: float32 heads under autocast.
"""

from .clip import Backbone, ImageFeatures, create_backbone, list_backbones

__all__ = ["Backbone", "ImageFeatures", "create_backbone", "list_backbones"]
