"""Importing official checkpoints (``clipad convert``) into clipad's checkpoint format.

``clipad convert --from anomalyclip epoch_15.pth out.safetensors`` reads an official checkpoint
with ``torch.load(weights_only=True)`` (tensors only, nothing else is unpickled) and writes a
clipad detector checkpoint (:mod:`clipad.checkpoint`): the learned tensors plus a header naming
the method, the paper's backbone and weights tag and the options the tensors imply. The result
works both ways:

- ``clipad.load_detector("out.safetensors")`` (``pretrained=`` overrides the weights source);
- ``clipad.create_detector("anomalyclip", checkpoint="out.safetensors", ...)``.

Each converter lives with its method (``methods/<name>/convert.py``) and is registered with it
(``@register_method(name, converter=...)``); :func:`clipad.methods.registry.list_converters`
names the sources. A converter turns the loaded object into a :class:`~clipad.checkpoint.Converted`
(learned tensors, implied options, dropped keys).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Converted, read_learned_weights, write_checkpoint
from .errors import ClipadError
from .methods import get_method
from .methods.base import make_options, options_dict
from .methods.registry import get_converter, list_converters

__all__ = ["Converted", "convert_checkpoint", "list_converters", "read_learned_weights"]


def _load_official(path: Path) -> Any:
    if not path.is_file():
        raise ClipadError(f"official checkpoint '{path}' does not exist")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClipadError(
            f"cannot read '{path}' as a tensor-only checkpoint ({first}); clipad never unpickles arbitrary objects"
        ) from exc


def _resolved_options(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every option of the method (the converter's values over the defaults), checked, as
    ``create_detector`` records them."""
    return options_dict(make_options(get_method(method), overrides))


def convert_checkpoint(
    source: str,
    path: str | Path,
    out: str | Path,
    *,
    backbone: str | None = None,
    pretrained: str | None = ...,  # type: ignore[assignment]
) -> Path:
    """Convert an official checkpoint into a clipad checkpoint (see the module docstring).

    Args:
        source: the official code that wrote the file, one of :func:`list_converters`
            (``anomalyclip``, ``adaptclip``).
        path: the official ``.pth``.
        out: the ``.safetensors`` to write.
        backbone / pretrained: what the header records (default: the method's paper backbone and
            its weights tag, e.g. ViT-L-14-336 / openai).
    """
    converter = get_converter(source)
    path, out = Path(path), Path(out)
    conv: Converted = converter(_load_official(path))
    cls = get_method(conv.method)
    bb = backbone or cls.default_backbone
    tag = (cls.default_pretrained if bb == cls.default_backbone else None) if pretrained is ... else pretrained
    options = _resolved_options(conv.method, conv.options)
    return write_checkpoint(
        out, method=conv.method, backbone=bb, pretrained=tag, seed=0,
        image_size=options.get("image_size") or conv.image_size, precision=options["precision"], options=options,
        learned=conv.learned, references={},
        extra={"converted_from": {
            "source": source, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "dropped": conv.dropped,
        }},
    )
