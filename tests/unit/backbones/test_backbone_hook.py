"""The per-layer hook of Backbone.encode_image and of the dual-path encoder, on the tiny random
CLIP, checked against the blocks run by hand; and the three conversions of the dual-path start."""

from __future__ import annotations

import warnings

import pytest
import torch

from clipad import ClipadError
from clipad.backbones.clip import Backbone, create_backbone
from clipad.backbones.dualpath import (
    dual_block,
    encode_image_dualpath,
    first_block_at_fraction,
    first_block_of_dpam_layer,
    first_block_of_last,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # a 4 x 4 grid of 16 px patches: N = 16


@pytest.fixture(scope="module")
def bb() -> Backbone:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return create_backbone("tiny", None, seed=0)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _all_layers(bb: Backbone) -> tuple[int, ...]:
    return tuple(range(1, bb.depth + 1))


def _same(a, b) -> None:
    assert torch.equal(a.cls, b.cls) and torch.equal(a.tokens, b.tokens)
    assert a.taps.keys() == b.taps.keys() and all(torch.equal(a.taps[k], b.taps[k]) for k in a.taps)


def _append_then_remove(prompt: torch.Tensor, add_at: int, remove_at: int):
    """A hook that appends ``prompt`` [P, W] after the image tokens before block ``add_at`` and
    removes it before block ``remove_at``; records the shapes it saw."""
    seen: list[tuple[int, tuple[int, ...]]] = []

    def hook(i: int, h: torch.Tensor) -> torch.Tensor | None:
        seen.append((i, tuple(h.shape)))
        if i == add_at:
            return torch.cat([h, prompt.to(h.dtype).expand(h.shape[0], -1, -1)], dim=1)
        if i == remove_at:
            return h[:, : h.shape[1] - prompt.shape[0]]
        return None

    return hook, seen


# --------------------------------------------------------------------------- Backbone.encode_image


def test_hook_returning_none_changes_nothing(bb, x):
    calls: list[tuple[int, torch.Tensor]] = []
    base = bb.encode_image(x, _all_layers(bb))
    hooked = bb.encode_image(x, _all_layers(bb), layer_hook=lambda i, h: calls.append((i, h)))
    _same(base, hooked)
    assert [i for i, _ in calls] == list(range(bb.depth))
    n = 1 + base.grid[0] * base.grid[1]
    assert all(h.shape == (2, n, bb.width) for _, h in calls)  # batch-first [B, 1 + N, W]
    # index k sees the stream entering block k: ln_pre's output, then the tap of layer k (1-based)
    emb, _ = bb.embed(x)
    assert torch.equal(calls[0][1], bb.visual.ln_pre(emb))
    assert all(torch.equal(h, base.taps[i]) for i, h in calls[1:])


@pytest.mark.parametrize("k", [0, 2])
def test_hook_editing_tokens_equals_running_the_blocks_by_hand(bb, x, k):
    c = 0.25
    hooked = bb.encode_image(x, _all_layers(bb), layer_hook=lambda i, h: h + c if i == k else None)
    h = bb.run_blocks(bb.visual.ln_pre(bb.embed(x)[0]), 0, k) + c
    taps = {}
    for i in range(k, bb.depth):
        h = bb.run_blocks(h, i, i + 1)
        taps[i + 1] = h
    cls, tokens = bb.pool(h)
    assert torch.equal(hooked.cls, cls) and torch.equal(hooked.tokens, tokens)
    assert all(torch.equal(hooked.taps[i], taps[i]) for i in taps)
    assert not torch.equal(hooked.cls, bb.encode_image(x).cls)


def test_appended_tokens_take_part_but_never_reach_the_outputs(bb, x):
    base = bb.encode_image(x, _all_layers(bb))
    prompt = torch.nn.Parameter(torch.randn(2, bb.width, generator=torch.Generator().manual_seed(1)))
    hook, seen = _append_then_remove(prompt, add_at=1, remove_at=3)
    out = bb.encode_image(x, _all_layers(bb), layer_hook=hook)
    n = 1 + base.grid[0] * base.grid[1]
    assert [s[1][1] for s in seen] == [n, n, n + 2, n + 2][: bb.depth]  # what each call was given
    assert out.tokens.shape == base.tokens.shape and out.cls.shape == base.cls.shape
    assert all(out.taps[k].shape == (2, n, bb.width) for k in out.taps)
    assert torch.equal(out.taps[1], base.taps[1])  # before the prompts entered
    assert not torch.allclose(out.taps[2], base.taps[2]) and not torch.allclose(out.cls, base.cls)
    # the same as running the blocks by hand with the prompts in blocks 1 and 2 (0-based)
    h = bb.run_blocks(bb.visual.ln_pre(bb.embed(x)[0]), 0, 1)
    h = bb.run_blocks(torch.cat([h, prompt.expand(2, -1, -1)], dim=1), 1, 3)[:, :n]
    cls, tokens = bb.pool(bb.run_blocks(h, 3))
    torch.testing.assert_close(out.cls, cls, rtol=0, atol=0)
    torch.testing.assert_close(out.tokens, tokens, rtol=0, atol=0)
    # gradients reach the learnable prompt through the frozen tower
    (out.tokens.square().mean() + out.cls.square().mean()).backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_tokens_kept_to_the_end_are_dropped_from_taps_and_outputs(bb, x):
    prompt = torch.randn(3, bb.width, generator=torch.Generator().manual_seed(2))
    hook, _ = _append_then_remove(prompt, add_at=0, remove_at=-1)
    out = bb.encode_image(x, (bb.depth,), layer_hook=hook)
    base = bb.encode_image(x, (bb.depth,))
    assert out.taps[bb.depth].shape == base.taps[bb.depth].shape and out.tokens.shape == base.tokens.shape


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda i, h: h[:, :-1], "L >= 17"),  # drops a patch row
        (lambda i, h: h[..., :-1], r"\[2, L, 64\]"),  # other width
        (lambda i, h: h[0], r"\[2, L, 64\]"),  # no batch dimension
        (lambda i, h: h.tolist(), "returned a list"),
    ],
)
def test_bad_hook_results_are_named(bb, x, bad, error):
    with pytest.raises(ClipadError, match=error):
        bb.encode_image(x, layer_hook=bad)


# --------------------------------------------------------------------------- dual path


@pytest.mark.parametrize("first", [1, 3, 5])  # tiny has 4 blocks; 5 = no dual block
def test_dual_path_hook_returning_none_changes_nothing(bb, x, first):
    layers = _all_layers(bb)
    base = encode_image_dualpath(bb, x, first, vv_taps=layers, orig_taps=layers)
    calls: list[int] = []
    hooked = encode_image_dualpath(bb, x, first, vv_taps=layers, orig_taps=layers, layer_hook=lambda i, h: calls.append(i))
    assert calls == list(range(bb.depth))
    assert torch.equal(base.cls, hooked.cls) and torch.equal(base.vv_tokens, hooked.vv_tokens)
    assert torch.equal(base.orig_tokens, hooked.orig_tokens)
    assert all(torch.equal(base.vv_taps[k], hooked.vv_taps[k]) for k in layers)
    assert all(torch.equal(base.orig_taps[k], hooked.orig_taps[k]) for k in layers)


def test_dual_path_hook_before_the_dual_blocks_equals_running_them_by_hand(bb, x):
    first, k, c = 3, 1, 0.5  # edit the stream entering block 1 (0-based); dual from block 3 (1-based)
    hooked = encode_image_dualpath(bb, x, first, layer_hook=lambda i, h: h + c if i == k else None)
    h = bb.run_blocks(bb.visual.ln_pre(bb.embed(x)[0]), 0, k) + c
    h = bb.run_blocks(h, k, first - 1)
    x_vv = h
    for blk in bb.blocks[first - 1 :]:
        h, x_vv = dual_block(blk, h, x_vv)
    assert torch.equal(hooked.vv_tokens, x_vv[:, 1:]) and torch.equal(hooked.orig_tokens, h[:, 1:])
    assert torch.equal(hooked.cls, bb.pool(h)[0])


def test_dual_path_without_dual_blocks_hooks_like_encode_image(bb, x):
    prompt = torch.randn(2, bb.width, generator=torch.Generator().manual_seed(3))
    hook, _ = _append_then_remove(prompt, add_at=1, remove_at=3)
    single = bb.encode_image(x, _all_layers(bb), layer_hook=hook)
    dual = encode_image_dualpath(bb, x, bb.depth + 1, orig_taps=_all_layers(bb), layer_hook=hook)
    assert torch.equal(single.cls, dual.cls)
    assert all(torch.equal(single.taps[k], dual.orig_taps[k]) for k in single.taps)


def test_dual_path_hook_appending_prompts_in_the_dual_blocks(bb, x):
    layers = _all_layers(bb)
    base = encode_image_dualpath(bb, x, 2, vv_taps=layers, orig_taps=layers)
    prompt = torch.nn.Parameter(torch.randn(2, bb.width, generator=torch.Generator().manual_seed(4)))
    hook, seen = _append_then_remove(prompt, add_at=2, remove_at=3)  # inside the dual blocks 2..4 (1-based)
    out = encode_image_dualpath(bb, x, 2, vv_taps=layers, orig_taps=layers, layer_hook=hook)
    n = 1 + out.grid[0] * out.grid[1]
    assert [s[1][1] for s in seen] == [n, n, n, n + 2]
    assert out.vv_tokens.shape == base.vv_tokens.shape == (2, n - 1, bb.width)
    assert all(out.vv_taps[k].shape == out.orig_taps[k].shape == (2, n, bb.width) for k in layers)
    assert torch.equal(out.vv_taps[2], base.vv_taps[2])
    assert not torch.allclose(out.vv_tokens, base.vv_tokens) and not torch.allclose(out.orig_tokens, base.orig_tokens)
    out.vv_tokens.square().mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


# --------------------------------------------------------------------------- where the dual path starts


def test_dual_path_start_conversions():
    # dual_path_blocks (AnoCLIP): the last 12 blocks
    assert first_block_of_last(24, 12) == 13 and first_block_of_last(12, 12) == 1
    assert first_block_of_last(4, 12) == 1 and first_block_of_last(24, 0) == 25
    # dpam_start (AnomalyCLIP): a depth fraction, rounded like the taps
    assert first_block_at_fraction(24, 0.25) == 6 and first_block_at_fraction(12, 0.25) == 3
    assert first_block_at_fraction(24, 1.0) == 24 and first_block_at_fraction(24, None) == 25
    # dpam_layer (AdaptCLIP): the official DPAM_layer as a fraction; dual on its last DPAM_layer - 1 blocks
    assert first_block_of_dpam_layer(24, 20 / 24) == 6 and first_block_of_dpam_layer(12, 20 / 24) == 4
    assert first_block_of_dpam_layer(24, 1.0) == 2 and first_block_of_dpam_layer(24, None) == 25
    # the official ViT-L settings of AnomalyCLIP (DPAM_layer=20) and AdaptCLIP (DPAM_layer=20) agree
    assert first_block_at_fraction(24, 0.25) == first_block_of_dpam_layer(24, 20 / 24)
    for bad in (first_block_at_fraction, first_block_of_dpam_layer):
        with pytest.raises(ClipadError, match="fraction of the depth"):
            bad(24, 1.5)
    with pytest.raises(ClipadError, match=">= 0"):
        first_block_of_last(24, -1)
