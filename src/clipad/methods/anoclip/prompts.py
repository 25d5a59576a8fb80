"""AnoCLIP's prompts: contrastive (antonym) state pairs in domain-aware template frames.

Facts from the official code (hq-deng/AnoVL @ 3a70bfd), kept as data here:

- 7 normal states and their 7 abnormal antonyms, in the code's order;
- 22 template frames, each instantiated with 3 domain phrases (objects: "industrial photo",
  "industrial image", "manufacturing image"; textures: "industrial photo", "textural photo",
  "surface picture"), domain-major: 66 templates;
- sentences template-major (sentence index = 7 * template + state), no trailing period;
- class embedding = L2-normalised mean of the **raw** (un-normalised) sentence embeddings;
- class names as given, except ``macaroni1`` / ``macaroni2`` -> ``macaroni``; underscores kept.

The ``medical`` domain is clipad's extension (the code has none): its phrases are ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...backbones.clip import Backbone
from ...errors import ClipadError

NORMAL_STATES = (
    "normal {}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "abnormal {}",
    "imperfect {}",
    "blemished {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

# Template frames: "{art}" is "a"/"an" for the domain phrase, "{domain}" the phrase, "{}" the state.
# The order matters: it is the row order of the TTA text adapter's prompt matrix.
TEMPLATE_FRAMES = (
    "a cropped {domain} of the {}",
    "a cropped {domain} of a {}",
    "a close-up {domain} of a {}",
    "a close-up {domain} of the {}",
    "a bright {domain} of a {}",
    "a bright {domain} of the {}",
    "a dark {domain} of the {}",
    "a dark {domain} of a {}",
    "a jpeg corrupted {domain} of a {}",
    "a jpeg corrupted {domain} of the {}",
    "a blurry {domain} of the {}",
    "a blurry {domain} of a {}",
    "{art} {domain} of a {}",
    "{art} {domain} of the {}",
    "{art} {domain} of a small {}",
    "{art} {domain} of the small {}",
    "{art} {domain} of a large {}",
    "{art} {domain} of the large {}",
    "{art} {domain} of the {} for visual inspection",
    "{art} {domain} of a {} for visual inspection",
    "{art} {domain} of the {} for anomaly detection",
    "{art} {domain} of a {} for anomaly detection",
)

DOMAIN_PHRASES: dict[str, tuple[str, ...]] = {
    "object": ("industrial photo", "industrial image", "manufacturing image"),
    "texture": ("industrial photo", "textural photo", "surface picture"),
    # clipad's extension for medical images (brain MRI, head CT, skin, endoscopy ...); not in the code
    "medical": ("medical image", "medical scan", "clinical photo"),
}
DOMAINS = ("auto", *DOMAIN_PHRASES)
TEXTURE_CLASSES = frozenset({"carpet", "leather", "grid", "tile", "wood"})
CLASS_NAME_MAP = {"macaroni1": "macaroni", "macaroni2": "macaroni"}


def resolve_domain(class_name: str, domain: str = "auto") -> str:
    """``auto`` -> ``texture`` for the MVTec AD texture classes, else ``object``; others pass through."""
    if domain not in DOMAINS:
        raise ClipadError(f"domain must be one of {', '.join(DOMAINS)}; got '{domain}'")
    if domain != "auto":
        return domain
    return "texture" if class_name.strip().lower() in TEXTURE_CLASSES else "object"


def prompt_class_name(class_name: str, spaces: bool = False) -> str:
    """The class name as it appears in prompts: ``macaroni1/2`` -> ``macaroni``; ``_`` -> space if asked."""
    name = CLASS_NAME_MAP.get(class_name, class_name)
    return name.replace("_", " ") if spaces else name


def templates_for(phrases: Sequence[str]) -> list[str]:
    """All template frames for each domain phrase, phrase-major: [22 * len(phrases)] strings with ``{}``."""
    out = []
    for phrase in phrases:
        art = "an" if phrase[:1].lower() in "aeiou" else "a"
        out += [f.replace("{art}", art).replace("{domain}", phrase) for f in TEMPLATE_FRAMES]
    return out


def state_sentences(name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Template-major sentences: index = len(states) * template + state."""
    filled = [s.format(name) for s in states]
    return [t.format(s) for t in templates for s in filled]


def encode_prompt_set(
    backbone: Backbone, name: str, phrases: Sequence[str], chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode both states' sentences for a prompt class name.

    Returns:
        means: [2, D] (normal, abnormal) class embeddings, each the normalised mean of raw embeddings.
        rows: [2 * P, D] every sentence embedding, L2-normalised, normal ones first (P = 22 * 7 *
            len(phrases) per state); the TTA text adapter's frozen prompt matrix.
    """
    templates = templates_for(phrases)
    means, rows = [], []
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        sentences = state_sentences(name, states, templates)
        emb = torch.cat(
            [backbone.encode_text(backbone.tokenize(sentences[i : i + chunk])) for i in range(0, len(sentences), chunk)]
        ).float()
        means.append(F.normalize(emb.mean(dim=0), dim=-1))
        rows.append(emb / emb.norm(dim=-1, keepdim=True))
    return torch.stack(means), torch.cat(rows)
