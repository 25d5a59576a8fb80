"""Writing fidelity fixtures: what every ``tools/*_fixtures.py`` stores, in one place.

``model.safetensors``: the random CLIP's state dict in the OpenAI layout, with the token
embedding reduced to the rows of the tokens the prompts use (``token_ids``, ``token_rows``; the
other rows cannot affect any output) to keep fixtures small; ``expected.safetensors``: what the
official code computed. Both carry ``meta`` in their headers. Tensors only: nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path

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
