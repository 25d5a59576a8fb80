"""The one way in: ``create_detector`` (build) and ``load_detector`` (restore a saved one)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from .backbones.clip import _check_name, create_backbone
from .errors import ClipadError
from .methods import get_method
from .methods.base import Detector

_UNSET: Any = object()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def create_detector(
    method: str,
    backbone: str | None = None,
    pretrained: str | Path | None = _UNSET,
    device: str | torch.device | None = None,
    *,
    seed: int = 0,
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
        **options: method options, e.g. ``image_size=518``, ``scales=(2, 3)``.
    """
    cls = get_method(method)
    backbone = backbone or cls.default_backbone
    # An unknown name is reported as such (with the valid names) before asking for pretrained=.
    _check_name(backbone)
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
    params = inspect.signature(cls.__init__).parameters
    valid = [n for n, p in params.items() if n not in ("self", "backbone") and p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ClipadError(f"unknown option(s) {unknown} for method '{method}'. Valid options: {', '.join(valid)}")
    dev = torch.device(device) if device is not None else default_device()
    bb = create_backbone(backbone, pretrained, device=dev, seed=seed)
    det = cls(bb, **options)
    det.seed = seed
    resolved = {n: options.get(n, params[n].default) for n in valid}
    det.options = _jsonable(resolved)
    return det.to(dev).eval()


def load_detector(
    path: str | Path,
    device: str | torch.device | None = None,
    pretrained: str | Path | None = _UNSET,
) -> Detector:
    """Restore a detector saved with ``det.save(path)``; predictions are identical.

    ``pretrained`` overrides the recorded weights source (e.g. the checkpoint file moved).
    """
    from .checkpoint import read_checkpoint, split_tensors

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
    det.load_learned_state({k: v.to(det.device) for k, v in learned.items()})
    det._references = {c: {k: v.to(det.device) for k, v in r.items()} for c, r in refs.items()}
    return det
