"""The one way in: ``create_detector`` (build) and ``load_detector`` (restore a saved one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .backbones import backbone_family, check_backbone_name, create_backbone, tiny_backbone
from .checkpoint import checkpoint_error, read_checkpoint, read_learned_weights, split_tensors
from .errors import ClipadError, UnknownNameError
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
        backbone: ``tiny`` (the tiny random model of the method's backbone family), an open_clip
            architecture or a DINOv2 name (``dinov2_vits14``...); default: the method's paper backbone.
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
    backbone = backbone_for(cls, backbone or cls.default_backbone)
    opts = make_options(cls, options)
    if pretrained is _UNSET:
        if backbone in ("tiny", tiny_backbone("dinov2")):
            pretrained = None
        elif backbone == cls.default_backbone:
            pretrained = cls.default_pretrained
        else:
            raise ClipadError(
                f"backbone '{backbone}' needs an explicit pretrained= (an open_clip tag, 'lvd142m' for DINOv2, "
                "a checkpoint file, or None for random weights)"
            )
    checkpoint = opts.checkpoint if issubclass(cls, LearnedDetector) else None
    # read (and checked) before anything is built: a bad file fails fast
    learned = read_learned_weights(checkpoint, cls.name) if checkpoint is not None else None
    dev = torch.device(device) if device is not None else default_device()
    bb = create_backbone(backbone, pretrained, device=dev, seed=seed, quick_gelu=quick_gelu, **cls.backbone_options(opts, backbone))
    det = cls(bb, opts if checkpoint is None else replace(opts, checkpoint=None))
    det.seed = seed
    if learned is not None:  # once the method has built its modules
        det.load_learned_state(learned)
        det.opts = opts  # recorded as given
    return det.to(dev).eval()


def load_detector(
    path: str | Path,
    device: str | torch.device | None = None,
    pretrained: str | Path | None = _UNSET,
    quick_gelu: bool | None = _UNSET,
) -> Detector:
    """Restore a detector saved with ``det.save(path)``; predictions are identical.

    ``pretrained`` overrides the recorded weights source (e.g. the checkpoint file moved);
    ``quick_gelu`` the recorded backbone activation (None: auto), e.g. for such a file.

    The file's header is checked before anything is built: its schema (:mod:`clipad.checkpoint`),
    then the method, the backbone name and every option value (the method's ``Options``); the
    tensors must be finite and fit the detector.

    Raises:
        MissingFileError: no such file.
        CheckpointError: anything wrong with the file; one bounded message naming the entry.
    """
    meta, tensors = read_checkpoint(path)
    cls = _from_header(path, "method", lambda: get_method(meta["method"]))
    _from_header(path, "backbone", lambda: _check_backbone(meta["backbone"]))
    _from_header(path, "options", lambda: make_options(cls, meta["options"]))
    det = create_detector(
        meta["method"],
        backbone=meta["backbone"],
        pretrained=meta["pretrained"] if pretrained is _UNSET else pretrained,
        device=device,
        seed=meta["seed"],
        # files written before it was recorded: auto
        quick_gelu=meta.get("quick_gelu") if quick_gelu is _UNSET else quick_gelu,
        **meta["options"],
    )
    learned, refs = split_tensors(meta, tensors)
    _from_header(path, "learned tensors", lambda: det.load_learned_state(learned))
    _from_header(path, "reference tensors", lambda: det.load_references(refs))
    # files written before calibration existed (or never calibrated) have none
    _from_header(path, "thresholds", lambda: det.load_thresholds(meta.get("thresholds") or {}))
    return det


def backbone_for(cls: type[Detector], name: str) -> str:
    """The backbone name a method builds for ``name``: ``"tiny"`` becomes the tiny model of the
    method's first family (:attr:`Detector.backbone_families`); an unknown name, or one of a family
    the method cannot run on, is an error naming the valid choices (before pretrained= is asked for).

    Raises:
        UnknownNameError: no such backbone. ClipadError: a backbone of another family.
    """
    families = getattr(cls, "backbone_families", ("clip",))
    if name == "tiny":
        name = tiny_backbone(families[0])
    check_backbone_name(name)
    family = backbone_family(name)
    if family not in families:
        wanted = " or ".join("DINOv2" if f == "dinov2" else "CLIP" for f in families)
        example = "dinov2_vits14, dinov2_vitb14_reg, 'tiny'" if families[0] == "dinov2" else "ViT-B-16-plus-240, 'tiny'"
        raise ClipadError(
            f"method '{cls.name}' runs on {wanted} backbones; '{name}' is a {'DINOv2' if family == 'dinov2' else 'CLIP'} "
            f"backbone. Pass one of its family (e.g. {example}; all: clipad.list_backbones())"
        )
    return name


def _check_backbone(name: str) -> None:
    """:func:`check_backbone_name` with a short message for an unknown name (its own lists every architecture)."""
    try:
        check_backbone_name(name)
    except UnknownNameError:
        raise UnknownNameError(f"unknown backbone '{name}' (clipad.list_backbones() lists the valid names)") from None


def _from_header(path: str | Path, entry: str, check: Callable[[], Any]) -> Any:
    """``check()``, its error reworded as a :class:`CheckpointError` of the file's ``entry``."""
    try:
        return check()
    except ClipadError as exc:
        raise checkpoint_error(path, f"{entry}: {exc}") from None
