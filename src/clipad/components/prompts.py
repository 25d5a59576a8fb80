"""Prompt ensembles and their encoding through the frozen text tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backbones.clip import Backbone

# WinCLIP's compositional prompt ensemble (WinCLIP paper, as in anomalib's reference
# implementation). The repeated "jpeg corrupted ... the" frame is kept on purpose: the reference
# averages over it twice, and fidelity means the same mean.
WINCLIP_NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
WINCLIP_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def compose_prompts(class_name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template around every state, state-major: ``[t.format(s.format(c)) for s in states for t in templates]``."""
    return [t.format(s.format(class_name)) for s in states for t in templates]


def mean_text_embedding(backbone: Backbone, prompts: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """[D] mean of the raw (un-normalised) text embeddings of ``prompts``."""
    parts = [backbone.encode_text(backbone.tokenize(list(prompts[i : i + chunk]))) for i in range(0, len(prompts), chunk)]
    return torch.cat(parts).float().mean(dim=0)


def state_embeddings(
    backbone: Backbone, class_name: str, state_sets: Sequence[Sequence[str]], templates: Sequence[str]
) -> torch.Tensor:
    """[S, D] one mean embedding per state set (e.g. normal, anomalous), in the given order."""
    return torch.stack([mean_text_embedding(backbone, compose_prompts(class_name, s, templates)) for s in state_sets])
