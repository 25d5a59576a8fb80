"""clipad's checkpoint format: one ``.safetensors`` file, configuration in its header.

Tensors: ``learned.<name>`` (a method's learned weights) and ``reference.<i>.<name>`` (reference
memory of the i-th class in the header's ``reference_classes`` list). Header metadata (strings):
``format`` = "clipad", ``clipad_version``, ``method``, ``backbone``, ``pretrained``, ``seed``,
``image_size``, ``precision``, ``options`` (JSON), ``reference_classes`` (JSON), and for a
converted official checkpoint ``converted_from`` (JSON). Nothing is ever unpickled.

This module knows the format only: it writes and reads plain data (names, JSON-able options,
tensors) and never a detector, so it sits below the methods that use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ClipadError

FORMAT = "clipad"


@dataclass
class Converted:
    """What a converter of official checkpoints returns: learned tensors (named as the method's
    ``learned_state``), the detector options they imply, notes on dropped keys, and the paper's
    input size (recorded in the header when the options leave ``image_size`` None)."""

    method: str
    learned: dict[str, torch.Tensor]
    options: dict[str, Any]
    dropped: list[str] = field(default_factory=list)
    image_size: int | None = None


def write_checkpoint(
    path: str | Path,
    *,
    method: str,
    backbone: str,
    pretrained: str | None,
    seed: int,
    image_size: int,
    precision: str,
    options: Mapping[str, Any],
    learned: Mapping[str, torch.Tensor],
    references: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one clipad checkpoint.

    Args:
        method / backbone / pretrained / seed / image_size / precision: the header fields.
        options: the method's options, JSON-able (what ``create_detector(method, **options)`` takes).
        learned: learned tensors by name, stored as float32.
        references: ``{class_name: {name: tensor}}`` reference memories ("" = the default set).
        extra: more JSON-able header entries (e.g. ``converted_from``).
    """
    from .version import __version__

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in learned.items():
        tensors[f"learned.{k}"] = v.detach().float().cpu().contiguous()
    classes = list(references or {})
    for i, name in enumerate(classes):
        for k, v in references[name].items():
            tensors[f"reference.{i}.{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "clipad_version": __version__,
        "method": method,
        "backbone": backbone,
        "pretrained": json.dumps(pretrained),
        "seed": str(int(seed)),
        "image_size": str(int(image_size)),
        "precision": precision,
        "options": json.dumps(dict(options)),
        "reference_classes": json.dumps(classes),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
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


def read_learned_weights(path: str | Path, method: str) -> dict[str, torch.Tensor]:
    """The learned tensors of a clipad checkpoint made for ``method`` (a saved detector, a
    training checkpoint or a converted official checkpoint)."""
    meta, tensors = read_checkpoint(path)
    if meta.get("method") != method:
        raise ClipadError(f"checkpoint '{path}' holds weights of method '{meta.get('method')}', not '{method}'")
    learned, _ = split_tensors(meta, tensors)
    if not learned:
        raise ClipadError(f"checkpoint '{path}' holds no learned weights")
    return learned
