"""Official AdaptCLIP checkpoints (gaobb/AdaptCLIP ``train.py``) -> clipad's learned adapters
(the mapping is in :func:`convert_official`'s docstring)."""

from __future__ import annotations

from typing import Any

import torch

from ...checkpoint import Converted
from ...components.scoring import default_image_size
from ...errors import ClipadError

_OFFICIAL_LEARNERS = ("textual_learner", "visual_learner", "pq_learner")


def convert_official(obj: Any) -> Converted:
    """An official AdaptCLIP checkpoint (``{"textual_learner", "visual_learner", "pq_learner"}``
    state dicts, as ``train.py`` saves them) -> :class:`~clipad.checkpoint.Converted`.

    Mapping: ``ctx_pos`` / ``ctx_neg`` [1, 1, n_ctx, W] -> ``prompts.ctx`` [2, n_ctx, W];
    ``{global_adapter,local_adater}.fc.{0,1,3}`` -> ``visual_adapter.{global,local}_mlp.{fc1,norm,fc2}``;
    ``sharebn.<i>`` -> ``pq_adapter.norms.<i>``; ``local_adapter.0.<j>`` / ``global_adapter.0.<j>``
    -> ``pq_adapter.seg_head.<j>`` / ``pq_adapter.image_head.<j>`` (entries 1.. of those lists are
    the same module and must be equal). Dropped: the prompt buffers ``token_prefix_*``,
    ``token_suffix_*``, ``tokenized_prompts_*`` (clipad recomputes them) and BatchNorm
    ``num_batches_tracked``.
    """
    if not isinstance(obj, dict) or not all(k in obj for k in _OFFICIAL_LEARNERS):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ClipadError(f"not an AdaptCLIP checkpoint: expected a dict with {list(_OFFICIAL_LEARNERS)}, found {found}")
    tl, vl, pq = (obj[k] for k in _OFFICIAL_LEARNERS)
    for key in ("ctx_pos", "ctx_neg"):
        if key not in tl:
            raise ClipadError(f"AdaptCLIP checkpoint has no '{key}' in its textual_learner (keys: {sorted(tl)[:8]})")
    pos, neg = tl["ctx_pos"].float(), tl["ctx_neg"].float()
    if pos.shape != neg.shape or pos.ndim != 4 or pos.shape[0] * pos.shape[1] != 1:
        raise ClipadError(f"AdaptCLIP ctx_pos/ctx_neg must both be [1, 1, n_ctx, width]; got {tuple(pos.shape)} and {tuple(neg.shape)}")
    n_ctx, width = pos.shape[-2:]
    learned = {"prompts.ctx": torch.cat([pos.reshape(1, n_ctx, width), neg.reshape(1, n_ctx, width)])}
    dropped = [f"textual_learner.{k}" for k in tl if k not in ("ctx_pos", "ctx_neg")]

    def put(target: str, value: torch.Tensor, source: str) -> None:
        if source.endswith("num_batches_tracked"):
            dropped.append(source)
        else:
            learned[target] = value.float()

    renames = {"0": "fc1", "1": "norm", "3": "fc2"}
    for key, value in vl.items():
        branch, _, index, *rest = key.split(".")  # e.g. global_adapter.fc.1.running_mean
        mlp = {"global_adapter": "global_mlp", "local_adater": "local_mlp"}.get(branch)
        if mlp is None or index not in renames:
            raise ClipadError(f"unexpected key 'visual_learner.{key}' in the AdaptCLIP checkpoint")
        put(f"visual_adapter.{mlp}.{renames[index]}.{'.'.join(rest)}", value, f"visual_learner.{key}")
    for key, value in pq.items():
        head, copy, *rest = key.split(".")
        if head == "sharebn":
            put(f"pq_adapter.norms.{copy}.{'.'.join(rest)}", value, f"pq_learner.{key}")
        elif head in ("local_adapter", "global_adapter"):
            first = pq[".".join([head, "0", *rest])]
            if not torch.equal(first, value):
                raise ClipadError(
                    f"pq_learner.{key} differs from entry 0 of its list: the official heads are one shared module"
                )
            if copy == "0":
                name = "seg_head" if head == "local_adapter" else "image_head"
                put(f"pq_adapter.{name}.{'.'.join(rest)}", value, f"pq_learner.{key}")
        else:
            raise ClipadError(f"unexpected key 'pq_learner.{key}' in the AdaptCLIP checkpoint")
    try:
        hidden, dim = learned["visual_adapter.global_mlp.fc1.weight"].shape
        mid = int(learned["pq_adapter.seg_head.0.weight"].shape[0])
    except KeyError as exc:
        raise ClipadError(f"AdaptCLIP checkpoint lacks {exc}") from None
    layers = len({k.split(".")[2] for k in learned if k.startswith("pq_adapter.norms.")})
    options: dict[str, Any] = {"n_ctx": int(n_ctx), "va_reduction": int(dim // hidden), "pq_mid_dim": mid}
    if layers != 4:
        options["taps"] = tuple((i + 1) / layers for i in range(layers))
    notes = sorted({k for k in dropped if not k.endswith("num_batches_tracked")})
    if any(k.endswith("num_batches_tracked") for k in dropped):
        notes.append("*.num_batches_tracked")
    return Converted("adaptclip", {k: v.contiguous() for k, v in learned.items()}, options, notes, default_image_size(14))
