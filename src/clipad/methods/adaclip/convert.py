"""Official AdaCLIP checkpoints (caoyunkang/AdaCLIP ``method/trainer.py:AdaCLIP_Trainer.save``) ->
clipad's learned prompts and projections.

The official file is a flat dict of the trained tensors named ``clip_model.<module>.<...>``;
clipad's learned state uses the same names without the ``clip_model.`` prefix:

- ``text_prompter.static_prompts.<j>`` [M, Wt] and ``visual_prompter.static_prompts.<j>`` [M, Wv],
  j < J (the prompt depth);
- ``patch_token_layer.head.<i>.{weight,bias}`` [D, Wv] / [D], one per tap;
- ``cls_token_layer.head.0.{weight,bias}`` [D, D] / [D];
- ``dynamic_visual_prompt_generator.head.<i>.{weight,bias}`` [Wv, D] / [Wv] and
  ``dynamic_text_prompt_generator.head.<i>.{weight,bias}`` [Wt, D] / [Wt], i < M.

The official loader uses ``load_state_dict(strict=False)``, so a file with other names loads
silently as nothing (quirk). Here every key must be there with a consistent shape and nothing else
may be: a mismatch is one :class:`~clipad.errors.ClipadError` naming the keys.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...checkpoint import Converted
from ...components.scoring import default_image_size
from ...errors import ClipadError, shorten

PREFIX = "clip_model."
_KEY = re.compile(r"^(text_prompter|visual_prompter)\.static_prompts\.(\d+)$|"
                  r"^(patch_token_layer|cls_token_layer|dynamic_visual_prompt_generator|dynamic_text_prompt_generator)"
                  r"\.head\.(\d+)\.(weight|bias)$")


def _count(names: set[str], pattern: str) -> int:
    """How many consecutive indices 0.. of ``pattern`` (with ``{}`` for the index) are in ``names``."""
    n = 0
    while pattern.format(n) in names:
        n += 1
    return n


def expected_shapes(depth: int, length: int, taps: int, dim: int, width: int, text_width: int) -> dict[str, tuple[int, ...]]:
    """Every learned tensor of an AdaCLIP detector and its shape (names without the prefix)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for j in range(depth):
        shapes[f"text_prompter.static_prompts.{j}"] = (length, text_width)
        shapes[f"visual_prompter.static_prompts.{j}"] = (length, width)
    heads = {"patch_token_layer": (taps, width, dim), "cls_token_layer": (1, dim, dim),
             "dynamic_visual_prompt_generator": (length, dim, width), "dynamic_text_prompt_generator": (length, dim, text_width)}
    for module, (n, d_in, d_out) in heads.items():
        for i in range(n):
            shapes[f"{module}.head.{i}.weight"] = (d_out, d_in)
            shapes[f"{module}.head.{i}.bias"] = (d_out,)
    return shapes


def convert_official(obj: Any) -> Converted:
    """An official AdaCLIP checkpoint object -> :class:`~clipad.checkpoint.Converted` (see the
    module docstring). Implied options: ``prompt_depth`` J, ``prompt_length`` M and, for a number
    of taps other than 4, ``taps`` (evenly spaced fractions)."""
    if not isinstance(obj, dict) or not obj:
        found = type(obj).__name__ if not isinstance(obj, dict) else "an empty dict"
        raise ClipadError(f"not an AdaCLIP checkpoint: expected a dict of 'clip_model.*' tensors, found {found}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ClipadError(f"not an AdaCLIP checkpoint: entries {shorten([str(k) for k in bad[:6]], 150)} are not named tensors")
    unprefixed = sorted(k for k in obj if not k.startswith(PREFIX))
    sd = {k[len(PREFIX):]: v for k, v in obj.items() if k.startswith(PREFIX)}
    unknown = sorted(k for k in sd if not _KEY.match(k))
    if unprefixed or unknown:
        raise ClipadError(
            f"not an AdaCLIP checkpoint: unexpected keys {shorten((unprefixed + [PREFIX + k for k in unknown])[:6], 200)} "
            f"(an official file holds only clip_model.<prompter, projection or generator> tensors)"
        )
    names = set(sd)
    depth = _count(names, "text_prompter.static_prompts.{}")
    taps = _count(names, "patch_token_layer.head.{}.weight")
    try:
        length, text_width = sd["text_prompter.static_prompts.0"].shape
        width = sd["visual_prompter.static_prompts.0"].shape[1]
        dim = sd["cls_token_layer.head.0.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        raise ClipadError(f"AdaCLIP checkpoint lacks or misshapes {exc}: needs clip_model.text_prompter.static_prompts.0 "
                          "[M, Wt], clip_model.visual_prompter.static_prompts.0 [M, Wv], clip_model.cls_token_layer.head.0.weight "
                          "[D, D]") from None
    want = expected_shapes(depth, int(length), taps, int(dim), int(width), int(text_width))
    missing, extra = sorted(set(want) - names), sorted(names - set(want))
    if missing or extra or not taps:
        raise ClipadError(
            f"AdaCLIP checkpoint keys do not fit one model (J={depth} prompt sets, M={length} tokens, {taps} taps): "
            f"missing {shorten([PREFIX + k for k in missing[:6]], 200)}, unexpected {shorten([PREFIX + k for k in extra[:6]], 200)}"
        )
    wrong = [f"{PREFIX}{k} {tuple(sd[k].shape)} (expected {want[k]})" for k in want if tuple(sd[k].shape) != want[k]]
    if wrong:
        raise ClipadError(f"AdaCLIP checkpoint tensors have inconsistent shapes: {shorten(wrong[:4], 300)}")
    learned = {k: sd[k].float().contiguous() for k in want}
    options: dict[str, Any] = {"prompt_depth": depth, "prompt_length": int(length)}
    if taps != 4:
        options["taps"] = tuple((i + 1) / taps for i in range(taps))
    return Converted("adaclip", learned, options, [], default_image_size(14))
