"""Official AnomalyCLIP checkpoints (zqhang/AnomalyCLIP ``train.py``) -> clipad's learned prompts.

``{"prompt_learner": state_dict}`` with ``ctx_pos`` / ``ctx_neg`` [1, 1, n_ctx, W] ->
``prompts.ctx`` [2, n_ctx, W] (normal, abnormal) and ``compound_prompts_text.<i>`` [t, W] ->
``prompts.deep`` [depth - 1, t, W]. Dropped, and listed in the header:
``compound_prompt_projections.*`` (created but never used by the official forward) and the
buffers ``token_prefix_*``, ``token_suffix_*``, ``tokenized_prompts_*`` (recomputed by clipad from
the backbone's own token embedding and tokenizer).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...checkpoint import Converted
from ...components.scoring import default_image_size
from ...errors import ClipadError


def summarise_dropped(keys: list[str]) -> list[str]:
    """['a.0.weight', 'a.1.weight', 'b'] -> ['a.*', 'b']: readable header notes."""
    out: list[str] = []
    for k in keys:
        head = re.sub(r"\.\d+(\..*)?$", ".*", k)
        if head not in out:
            out.append(head)
    return out


def convert_official(obj: Any) -> Converted:
    """An official AnomalyCLIP checkpoint object -> :class:`~clipad.checkpoint.Converted` (see the
    module docstring)."""
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
    return Converted("anomalyclip", learned, options, summarise_dropped(sorted(set(sd) - used)), default_image_size(14))
