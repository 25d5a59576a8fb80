"""Learned-weights files: importing official checkpoints (``clipad convert``) and reading learned
weights back (the ``checkpoint=`` option of the learned methods).

``clipad convert --from anomalyclip epoch_15.pth out.safetensors`` reads an official checkpoint
with ``torch.load(weights_only=True)`` (tensors only, nothing else is unpickled) and writes a
clipad detector checkpoint (:mod:`clipad.checkpoint`): the learned tensors plus a header naming
the method, the paper's backbone and weights tag and the options the tensors imply. The result
works both ways:

- ``clipad.load_detector("out.safetensors")`` (``pretrained=`` overrides the weights source);
- ``clipad.create_detector("anomalyclip", checkpoint="out.safetensors", ...)``.

Converters are registered per source in :data:`CONVERTERS`; each turns the loaded object into
(learned tensors, options, notes). AdaptCLIP's (keys ``textual_learner``, ``visual_learner``,
``pq_learner``) goes next to AnomalyCLIP's.

AnomalyCLIP (zqhang/AnomalyCLIP): ``{"prompt_learner": state_dict}`` with ``ctx_pos`` /
``ctx_neg`` [1, 1, n_ctx, W] -> ``prompts.ctx`` [2, n_ctx, W] (normal, abnormal) and
``compound_prompts_text.<i>`` [t, W] -> ``prompts.deep`` [depth - 1, t, W]. Dropped, and listed
in the header: ``compound_prompt_projections.*`` (created but never used by the official
forward) and the buffers ``token_prefix_*``, ``token_suffix_*``, ``tokenized_prompts_*``
(recomputed by clipad from the backbone's own token embedding and tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ClipadError


@dataclass
class Converted:
    """What a converter returns: learned tensors, the detector options they imply, and notes."""

    method: str
    learned: dict[str, torch.Tensor]
    options: dict[str, Any]
    dropped: list[str] = field(default_factory=list)
    image_size: int | None = None


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


def _summarise_dropped(keys: list[str]) -> list[str]:
    """['a.0.weight', 'a.1.weight', 'b'] -> ['a.*', 'b']: readable header notes."""
    out: list[str] = []
    for k in keys:
        head = re.sub(r"\.\d+(\..*)?$", ".*", k)
        if head not in out:
            out.append(head)
    return out


def convert_anomalyclip(obj: Any) -> Converted:
    """An official AnomalyCLIP checkpoint object -> :class:`Converted` (see the module docstring)."""
    from .components.scoring import default_image_size

    if not isinstance(obj, dict) or "prompt_learner" not in obj:
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ClipadError(f"not an AnomalyCLIP checkpoint: expected a dict with 'prompt_learner', found {found}")
    sd = obj["prompt_learner"]
    for key in ("ctx_pos", "ctx_neg"):
        if key not in sd:
            raise ClipadError(f"AnomalyCLIP checkpoint has no '{key}' in its prompt_learner (keys: {sorted(sd)[:8]})")
    pos, neg = sd["ctx_pos"].float(), sd["ctx_neg"].float()
    if pos.shape != neg.shape or pos.ndim != 4 or pos.shape[0] * pos.shape[1] != 1:
        raise ClipadError(
            f"AnomalyCLIP ctx_pos/ctx_neg must both be [1, 1, n_ctx, width]; got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    n_ctx, width = pos.shape[-2:]
    learned = {"prompts.ctx": torch.cat([pos.reshape(1, n_ctx, width), neg.reshape(1, n_ctx, width)]).contiguous()}
    deep_keys = sorted((k for k in sd if k.startswith("compound_prompts_text.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    deep_length = 0
    if deep_keys:
        deep = torch.stack([sd[k].float() for k in deep_keys])
        if deep.ndim != 3 or deep.shape[-1] != width:
            raise ClipadError(f"AnomalyCLIP compound_prompts_text must be [t, {width}] each; got {tuple(deep.shape[1:])}")
        learned["prompts.deep"] = deep.contiguous()
        deep_length = int(deep.shape[1])
    used = {"ctx_pos", "ctx_neg", *deep_keys}
    options = {"n_ctx": int(n_ctx), "deep_depth": len(deep_keys) + 1 if deep_keys else 0, "deep_length": deep_length or 4}
    return Converted("anomalyclip", learned, options, _summarise_dropped(sorted(set(sd) - used)), default_image_size(14))


def convert_adaptclip(obj: Any) -> Converted:
    """An official AdaptCLIP checkpoint object -> :class:`Converted` (the mapping is documented in
    :func:`clipad.methods.adaptclip.convert_official`)."""
    from .methods.adaptclip.model import convert_official

    return convert_official(obj)


CONVERTERS: dict[str, Callable[[Any], Converted]] = {"anomalyclip": convert_anomalyclip, "adaptclip": convert_adaptclip}


def _resolved_options(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """All keyword options of the method with their defaults, as ``create_detector`` records them."""
    import inspect

    from .api import _jsonable
    from .methods import get_method

    params = inspect.signature(get_method(method).__init__).parameters
    valid = [n for n, p in params.items() if n not in ("self", "backbone") and p.kind == p.KEYWORD_ONLY]
    return _jsonable({n: overrides.get(n, params[n].default) for n in valid})


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
        source: ``anomalyclip`` (AdaptCLIP next).
        path: the official ``.pth``.
        out: the ``.safetensors`` to write.
        backbone / pretrained: what the header records (default: the method's paper backbone and
            its weights tag, e.g. ViT-L-14-336 / openai).
    """
    from safetensors.torch import save_file

    from .version import __version__
    from .checkpoint import FORMAT
    from .methods import get_method

    if source not in CONVERTERS:
        raise ClipadError(f"unknown source '{source}'; clipad converts: {', '.join(sorted(CONVERTERS))}")
    path, out = Path(path), Path(out)
    conv = CONVERTERS[source](_load_official(path))
    cls = get_method(conv.method)
    bb = backbone or cls.default_backbone
    tag = (cls.default_pretrained if bb == cls.default_backbone else None) if pretrained is ... else pretrained
    options = _resolved_options(conv.method, conv.options)
    size = options.get("image_size") or conv.image_size
    meta = {
        "format": FORMAT,
        "clipad_version": __version__,
        "method": conv.method,
        "backbone": bb,
        "pretrained": json.dumps(tag),
        "seed": "0",
        "image_size": str(size),
        "precision": str(options.get("precision", "auto")),
        "options": json.dumps(options),
        "reference_classes": "[]",
        "converted_from": json.dumps({
            "source": source, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "dropped": conv.dropped,
        }),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"learned.{k}": v.contiguous() for k, v in conv.learned.items()}, str(out), metadata=meta)
    return out


def read_learned_weights(path: str | Path, method: str) -> dict[str, torch.Tensor]:
    """The learned tensors of a clipad checkpoint made for ``method`` (a saved detector, a
    training checkpoint or a converted official checkpoint)."""
    from .checkpoint import read_checkpoint, split_tensors

    meta, tensors = read_checkpoint(path)
    if meta.get("method") != method:
        raise ClipadError(f"checkpoint '{path}' holds weights of method '{meta.get('method')}', not '{method}'")
    learned, _ = split_tensors(meta, tensors)
    if not learned:
        raise ClipadError(f"checkpoint '{path}' holds no learned weights")
    return learned


# --------------------------------------------------------------------------- CLI




