"""The one way in: ``create_detector`` (build) and ``load_detector`` (restore a saved one)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .backbones.clip import _check_name, create_backbone
from .checkpoint import read_checkpoint, read_learned_weights, split_tensors
from .errors import ClipadError
from .methods import get_method
from .methods.base import Detector, LearnedDetector, make_options

_UNSET: Any = object()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_detector(
    method: str,
    backbone: str | None = None,
    pretrained: str | Path | None = _UNSET,
    device: str | torch.device | None = None,
    *,
    seed: int = 0,
    quick_gelu: bool | None = None,
    **options: Any,
) -> Detector:
    """Build a detector.

    Args:
        method: a registered method name (:func:`clipad.list_methods`).
        backbone: ``tiny`` or an open_clip architecture; default: the method's paper backbone.
        pretrained: open_clip tag, checkpoint file, or None (random init). Default: the method's
            tag when the backbone is the method's default, None for ``tiny``; other backbones
            need it explicitly.
        device: "cpu", "cuda", a torch.device; default CUDA when available.
        seed: seed of random initialisation (only used when ``pretrained`` is None).
        quick_gelu: the backbone's activation, None = auto (see :func:`clipad.backbones.create_backbone`).
        **options: the fields of the method's ``Options`` dataclass
            (``get_method(method).Options``), e.g. ``image_size=518``, ``scales=(2, 3)``; names
            and value types are checked before anything is built. A learned method's
            ``checkpoint=FILE`` loads that file's learned weights.
    """
    cls = get_method(method)
    backbone = backbone or cls.default_backbone
    # An unknown name is reported as such (with the valid names) before asking for pretrained=.
    _check_name(backbone)
    opts = make_options(cls, options)
    if pretrained is _UNSET:
        if backbone == "tiny":
            pretrained = None
        elif backbone == cls.default_backbone:
            pretrained = cls.default_pretrained
        else:
            raise ClipadError(
                f"backbone '{backbone}' needs an explicit pretrained= (an open_clip tag, a checkpoint "
                "file, or None for random weights)"
            )
    dev = torch.device(device) if device is not None else default_device()
    bb = create_backbone(backbone, pretrained, device=dev, seed=seed, quick_gelu=quick_gelu)
    checkpoint = opts.checkpoint if issubclass(cls, LearnedDetector) else None
    det = cls(bb, opts if checkpoint is None else replace(opts, checkpoint=None))
    det.seed = seed
    if checkpoint is not None:  # once the method has built its modules
        det.load_learned_state(read_learned_weights(checkpoint, det.name))
        det.opts = opts  # recorded as given
    return det.to(dev).eval()


def load_detector(
    path: str | Path,
    device: str | torch.device | None = None,
    pretrained: str | Path | None = _UNSET,
) -> Detector:
    """Restore a detector saved with ``det.save(path)``; predictions are identical.

    ``pretrained`` overrides the recorded weights source (e.g. the checkpoint file moved).
    """
    meta, tensors = read_checkpoint(path)
    det = create_detector(
        meta["method"],
        backbone=meta["backbone"],
        pretrained=meta["pretrained"] if pretrained is _UNSET else pretrained,
        device=device,
        seed=meta["seed"],
        **meta["options"],
    )
    learned, refs = split_tensors(meta, tensors)
    det.load_learned_state(learned)
    det.load_references(refs)
    return det
