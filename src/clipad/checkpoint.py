"""clipad's checkpoint format: one ``.safetensors`` file, configuration in its header.

Tensors: ``learned.<name>`` (a method's learned weights) and ``reference.<i>.<name>`` (reference
memory of the i-th class in the header's ``reference_classes`` list). Header metadata (strings):
``format`` = "clipad", ``clipad_version``, ``method``, ``backbone``, ``pretrained``, ``seed``,
``image_size``, ``precision``, ``options`` (JSON). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ClipadError

if TYPE_CHECKING:
    from .methods.base import Detector

FORMAT = "clipad"


def save_detector(det: Detector, path: str | Path) -> Path:
    from .version import __version__

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in det.learned_state().items():
        tensors[f"learned.{k}"] = v.detach().float().cpu().contiguous()
    classes = list(det._references)
    for i, name in enumerate(classes):
        for k, v in det._references[name].items():
            tensors[f"reference.{i}.{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "clipad_version": __version__,
        "method": det.name,
        "backbone": det.backbone.name,
        "pretrained": json.dumps(det.backbone.pretrained),
        "seed": str(det.seed),
        "image_size": str(det.image_size),
        "precision": det.precision,
        "options": json.dumps(det.options),
        "reference_classes": json.dumps(classes),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata with JSON fields decoded, tensors) of a clipad checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ClipadError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a bad checkpoint
        raise ClipadError(f"checkpoint '{path}' is not a readable .safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ClipadError(f"checkpoint '{path}' is not a clipad checkpoint (no 'format: clipad' in its header)")
    for key in ("pretrained", "options", "reference_classes"):
        meta[key] = json.loads(meta.get(key, "null"))
    meta["seed"] = int(meta.get("seed", 0))
    meta["image_size"] = int(meta["image_size"])
    return meta, tensors


def split_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """-> (learned state, {class_name: reference memory})."""
    learned = {k[len("learned."):]: v for k, v in tensors.items() if k.startswith("learned.")}
    refs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("reference."):
            _, idx, name = k.split(".", 2)
            refs.setdefault(meta["reference_classes"][int(idx)], {})[name] = v
    return learned, refs
