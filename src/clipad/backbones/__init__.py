"""Backbones: frozen image towers seen as token streams, in two families behind one surface.

- :mod:`.clip`: :class:`Backbone` (open_clip CLIP, image and text towers; ``tiny`` included);
- :mod:`.dinov2`: :class:`DinoV2Backbone` (DINOv2 through timm's modules, image only;
  ``tiny-dinov2`` included);
- :mod:`.weights`: where CLIP weights come from (a file, an open_clip tag, or random), offline errors;
- :mod:`.blocks`: the fused batch-first residual block;
- :mod:`.dualpath`: the value-value (V-V / DPAM) dual path, and the one place that turns each
  method's dual-path option into a start block;
- :mod:`.precision`: float32 heads under autocast.

One factory for both families: :func:`create_backbone` dispatches on the name
(:func:`backbone_family`); :func:`list_backbones` lists both; :func:`check_backbone_name` reports an
unknown name with the valid ones of both. ``"tiny"`` names the tiny model of a family
(:func:`tiny_backbone`): ``tiny`` for CLIP, ``tiny-dinov2`` for DINOv2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UnknownNameError
from .clip import Backbone, ImageFeatures, list_backbones as _list_clip
from .dinov2 import DinoV2Backbone, DinoV2Config, create_dinov2_backbone, is_dinov2, list_dinov2

FAMILIES = ("clip", "dinov2")
TINY = {"clip": "tiny", "dinov2": "tiny-dinov2"}


def list_backbones() -> list[str]:
    """Every backbone name: ``tiny`` and the open_clip architectures (CLIP), then ``tiny-dinov2``
    and the official DINOv2 hub names."""
    return _list_clip() + list_dinov2()


def backbone_family(name: str) -> str:
    """``"dinov2"`` for a DINOv2 name, else ``"clip"`` (whether the CLIP name exists is
    :func:`check_backbone_name`'s business)."""
    return "dinov2" if is_dinov2(name) else "clip"


def tiny_backbone(family: str) -> str:
    """The tiny random model of ``family`` (what ``backbone="tiny"`` means for a method of it)."""
    return TINY[family]


def check_backbone_name(name: str) -> None:
    """Raise :class:`UnknownNameError` (listing the valid names of both families) or the CLIP
    check's error for an open_clip architecture clipad cannot use; return for a usable name."""
    if is_dinov2(name):
        return
    from .clip import _check_name

    try:
        _check_name(name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc}; DINOv2: {', '.join(list_dinov2())}") from None


def create_backbone(
    name: str,
    pretrained: str | os.PathLike | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **kwargs: Any,
) -> Backbone | DinoV2Backbone:
    """Build a frozen backbone of either family by name.

    Args:
        name: a CLIP name (``tiny``, ``ViT-L-14-336``...) or a DINOv2 name (``dinov2_vitb14``,
            ``dinov2_vits14_reg``, ``tiny-dinov2``...); :func:`list_backbones` lists them.
        pretrained: CLIP: an open_clip tag or a file; DINOv2: ``"lvd142m"`` or a file (official
            ``.pth`` or timm); None: random weights from ``seed`` (with a ClipadWarning).
        **kwargs: the family factory's other arguments (:func:`clipad.backbones.clip.create_backbone`:
            ``quick_gelu``, ``config_activation``, ``cache_dir``;
            :func:`clipad.backbones.dinov2.create_dinov2_backbone`: ``cache_dir``, ``config``).

    Example::

        bb = create_backbone("dinov2_vitb14", "lvd142m", device="cuda")
        feats = bb.encode_image(bb.normalize(x), layers=(3, 6, 9, 12))  # taps[l]: [B, 1 + N, 768]
    """
    check_backbone_name(name)
    if is_dinov2(name):
        return create_dinov2_backbone(name, pretrained, device=device, seed=seed, **kwargs)
    from .clip import create_backbone as create_clip

    return create_clip(name, pretrained, device=device, seed=seed, **kwargs)


__all__ = ["Backbone", "DinoV2Backbone", "DinoV2Config", "FAMILIES", "ImageFeatures", "backbone_family",
           "check_backbone_name", "create_backbone", "list_backbones", "tiny_backbone"]
