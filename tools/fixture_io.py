"""Writing fidelity fixtures: what every ``tools/*_fixtures.py`` stores, in one place.

``model.safetensors``: the random CLIP's state dict in the OpenAI layout, with the token
embedding reduced to the rows of the tokens the prompts use (``token_ids``, ``token_rows``; the
other rows cannot affect any output) to keep fixtures small; ``expected.safetensors``: what the
official code computed. Both carry ``meta`` in their headers. Tensors only: nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def write_fixtures(
    out: Path,
    weights: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    meta: dict[str, str],
    used_tokens: torch.Tensor,
    official_commit: str,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``out/model.safetensors`` and ``out/expected.safetensors``; ``dtype`` (e.g. float16)
    stores the model weights smaller."""
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(weights)
    table = weights.pop("token_embedding.weight")
    model = {k: (v.to(dtype) if dtype is not None else v) for k, v in weights.items()}
    model["token_ids"] = used_tokens
    model["token_rows"] = table[used_tokens].to(dtype) if dtype is not None else table[used_tokens]
    save_file({k: v.contiguous() for k, v in model.items()}, str(out / "model.safetensors"), metadata=meta)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"), metadata=meta)
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out} ({total / 1e6:.2f} MB); official commit {official_commit}")


def perturbed_state(model: torch.nn.Module, seed: int, used_tokens: torch.Tensor, round_half: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s state dict (float32) with biases and LayerNorm parameters perturbed (their init
    0 / 1 would hide mistakes) and attention projections jittered, from a generator seeded
    ``seed + 1``; token-embedding rows of tokens not in ``used_tokens`` zeroed. ``round_half``
    rounds every value to float16 (what a float16 fixture stores)."""
    g = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for name, p in model.state_dict().items():
        p = p.detach().clone().float()
        is_norm = any(part.startswith("ln_") for part in name.split("."))
        if name.endswith("bias") or is_norm:
            p += 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("in_proj_weight") or name.endswith("out_proj.weight"):
            p += 0.02 * torch.randn(p.shape, generator=g)
        sd[name] = p.half().float() if round_half else p
    keep = torch.zeros(sd["token_embedding.weight"].shape[0], dtype=torch.bool)
    keep[used_tokens] = True
    sd["token_embedding.weight"][~keep] = 0
    return sd


def write_test_pair(
    root: Path, cls: str, make_image: Callable[[bool], tuple[np.ndarray, np.ndarray]]
) -> tuple[list[dict], list[np.ndarray], list[np.ndarray], list[int]]:
    """A good then a defective test image of class ``cls`` (``make_image(defect) -> (uint8 [H, W, 3],
    uint8 mask [H, W])``), written in the official ``meta.json`` layout under ``root`` ->
    (meta entries, images [3, H, W], masks [H, W] bool, labels)."""
    from PIL import Image

    entries, images, masks, labels = [], [], [], []
    for i, specie in enumerate(("good", "defect")):
        img, mask = make_image(specie != "good")
        rel = f"{cls}/test/{specie}/{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        mask_rel = ""
        if specie != "good":
            mask_rel = f"{cls}/ground_truth/{specie}/{i:03d}_mask.png"
            (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / mask_rel)
        entries.append(dict(img_path=rel, mask_path=mask_rel, cls_name=cls, specie_name=specie, anomaly=int(specie != "good")))
        images.append(img.transpose(2, 0, 1))
        masks.append(mask > 0)
        labels.append(int(specie != "good"))
    return entries, images, masks, labels


def synthetic_image(rng: np.random.Generator, size: int, defect: bool, *, coarse: int, box: tuple[int, int],
                    margin: tuple[int, int], mask_value: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random colour field (bicubic from a ``coarse`` x ``coarse`` grid) with fine noise,
    uint8 [S, S, 3], and its defect mask, uint8 [S, S]: with ``defect``, a flat-colour ``box``
    (h, w) whose top-left corner is drawn in [margin[0], S - margin[1]) and ``mask_value`` inside."""
    grid = torch.from_numpy(rng.random((1, 3, coarse, coarse))).float()
    field = torch.nn.functional.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[0]
    img = field.permute(1, 2, 0).numpy() * 0.8 + rng.random((size, size, 3)) * 0.2
    mask = np.zeros((size, size), np.uint8)
    if defect:
        y, x = rng.integers(margin[0], size - margin[1], size=2)
        img[y : y + box[0], x : x + box[1]] = rng.random(3)
        mask[y : y + box[0], x : x + box[1]] = mask_value
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask
