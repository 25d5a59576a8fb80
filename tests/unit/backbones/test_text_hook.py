"""``Backbone.encode_text(layer_hook=..., min_length=...)``: the per-block hook of the text tower
(AdaCLIP's text prompts), checked against open_clip's own full-context text tower."""

from __future__ import annotations

import warnings

import pytest
import torch

from clipad import ClipadError
from clipad.backbones.clip import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5


@pytest.fixture(scope="module")
def bb():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return create_backbone("tiny", None, seed=3)


def _full_context(bb, ids: torch.Tensor, overwrite=None) -> torch.Tensor:
    """Reference: every block on the whole 77-token context (no cut), positions 1..M overwritten
    before the blocks ``overwrite`` names ({block: [T, M, W]})."""
    clip = bb.clip
    x = clip.token_embedding(ids) + clip.positional_embedding
    for i, blk in enumerate(clip.transformer.resblocks):
        if overwrite and i in overwrite:
            ctx = overwrite[i]
            x = torch.cat([x[:, :1], ctx, x[:, 1 + ctx.shape[1] :]], dim=1)
        x = blk(x, attn_mask=clip.attn_mask)
    return bb.pool_text(x, ids.argmax(dim=-1))


def test_no_hook_and_none_hook_are_the_plain_tower(bb):
    ids = bb.tokenize(["a photo of a bottle.", "flawless carpet"])
    with torch.no_grad():
        ref = bb.clip.encode_text(ids)
        assert (bb.encode_text(ids) - ref).abs().max() < ATOL
        assert (bb.encode_text(ids, layer_hook=lambda i, x: None) - ref).abs().max() < ATOL


def test_hook_overwrites_before_blocks_and_min_length_keeps_positions(bb):
    """Overwriting positions 1..M before block 1 equals the full-context computation, also for a
    sentence shorter than M + 1 tokens (min_length keeps the positions the hook writes, so the
    EOT is overwritten exactly as with 77 tokens)."""
    m = 6
    ids = bb.tokenize(["cat", "a bad photo of a metal nut."])  # 3 and 10 tokens
    ctx = torch.randn(2, m, 64, generator=torch.Generator().manual_seed(0))
    calls: list[tuple[int, int]] = []

    def hook(i, x):
        calls.append((i, x.shape[1]))
        return torch.cat([x[:, :1], ctx, x[:, 1 + m :]], dim=1) if i == 1 else None

    with torch.no_grad():
        ours = bb.encode_text(ids, layer_hook=hook, min_length=1 + m)
        ref = _full_context(bb, ids, {1: ctx})
        plain = bb.encode_text(ids)
    assert calls == [(0, 10), (1, 10)]  # cut at the longest sentence's EOT, not at 77
    assert (ours - ref).abs().max() < ATOL
    assert (ours - plain).abs().max() > 1e-3
    # the first sentence's EOT (position 2) lies inside the overwritten span: without min_length
    # the cut would keep it only because the other sentence is longer
    with torch.no_grad():
        alone = bb.encode_text(ids[:1], layer_hook=lambda i, x: torch.cat([x[:, :1], ctx[:1], x[:, 1 + m :]], dim=1)
                               if i == 1 else None, min_length=1 + m)
    assert (alone - ref[:1]).abs().max() < ATOL


def test_hook_gradients_and_bad_returns(bb):
    ids = bb.tokenize(["a photo of a bottle."])
    ctx = torch.zeros(1, 3, 64, requires_grad=True)
    out = bb.encode_text(ids, layer_hook=lambda i, x: torch.cat([x[:, :1], ctx, x[:, 4:]], dim=1) if i == 1 else None)
    out.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())
    with pytest.raises(ClipadError, match="text layer_hook"):
        bb.encode_text(ids, layer_hook=lambda i, x: x[:, :2])
    with pytest.raises(ClipadError, match="text layer_hook"):
        bb.encode_text(ids, layer_hook=lambda i, x: "tokens")
