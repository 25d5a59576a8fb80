"""The value-value ("V-V") dual-path forward of a frozen CLIP image tower.

From a chosen block on, every block is run twice on the same normalised input:

- the *original* path is the vanilla block (attention with queries and keys, then the FFN);
- the *V-V* path adds only ``out_proj(softmax(V V^T / sqrt(d)) V)`` to its own residual stream:
  the values attend to themselves, and the FFN is skipped.

Both paths read ``ln_1`` of the **original** path's state: the V-V stream is an accumulator that
starts from the single-path state before the first dual block and never feeds back into the
attention. CLIP Surgery introduced this "architecture surgery"; AnoCLIP applies it to the last 12
blocks and takes its local tokens from the final V-V state, AnomalyCLIP / AdaptCLIP ("DPAM") use
the same path with other start blocks and taps. The CLS embedding comes from the original path,
which is exactly vanilla CLIP.

The official AnoCLIP code (hq-deng/AnoVL) returns its per-layer token list with the tensors
updated in place by the later blocks, so every V-V "tap" it returns equals the final V-V state
(and its original-path taps are the next block's state after attention). Only the final V-V
tokens are used by that method, so this module returns the *correct* state after each requested
block, as separate tensors; the final-layer values, the ones AnoCLIP uses, are identical.

Both attentions go through ``scaled_dot_product_attention`` in one call (fused kernels; agrees with
the explicit softmax of the reference to ~1e-6 in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .clip import Backbone
from .blocks import fusable, merge_heads, qkv_heads, residual_block
from ..errors import ClipadError


@dataclass
class DualFeatures:
    """What one dual-path pass of the image tower gives.

    cls: [B, D] CLS embedding of the original path after ``ln_post`` and ``proj`` (= vanilla CLIP).
    vv_tokens: [B, N, W] patch tokens of the final V-V state, un-normalised residual stream
        (``backbone.project`` maps them into the joint space).
    orig_tokens: [B, N, W] patch tokens of the final original-path state, un-normalised.
    vv_taps: layer -> [B, 1 + N, W] V-V state after that block (CLS row first). For a layer
        before the first dual block the V-V state is the single-path state.
    orig_taps: layer -> [B, 1 + N, W] original-path state after that block.
    grid: (gh, gw) patch grid, N = gh * gw.
    """

    cls: torch.Tensor
    vv_tokens: torch.Tensor
    orig_tokens: torch.Tensor
    vv_taps: dict[int, torch.Tensor] = field(default_factory=dict)
    orig_taps: dict[int, torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, int] = (0, 0)


def first_block_of_last(depth: int, count: int) -> int:
    """1-based index of the first of the last ``count`` blocks (clipped): depth + 1 when count is 0."""
    if count < 0:
        raise ClipadError(f"the number of dual-path blocks must be >= 0; got {count}")
    return max(1, depth - count + 1)


def dual_block(blk: nn.Module, x_orig: torch.Tensor, x_vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dual-path step of an open_clip ``ResidualAttentionBlock``.

    Args:
        blk: the block (``ln_1``, ``attn`` (batch-first ``nn.MultiheadAttention``), ``ls_1``,
            ``ln_2``, ``mlp``, ``ls_2``).
        x_orig: [B, L, W] original-path state.
        x_vv: [B, L, W] V-V state.
    Returns:
        (new original-path state [B, L, W], new V-V state [B, L, W]); new tensors, inputs untouched.
    """
    if not fusable(blk):
        raise ClipadError(
            f"the dual path needs open_clip blocks with a batch-first nn.MultiheadAttention; got {type(blk.attn).__name__}"
        )
    b = x_orig.shape[0]
    q, k, v = qkv_heads(blk.attn, blk.ln_1(x_orig))
    # one fused call for both paths: queries (q, v), keys (k, v), values (v, v)
    both = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
    both = blk.ls_1(merge_heads(blk.attn, both))
    x_orig = x_orig + both[:b]
    x_orig = x_orig + blk.ls_2(blk.mlp(blk.ln_2(x_orig)))
    return x_orig, x_vv + both[b:]  # V-V path: residual of the attention only, FFN skipped


def encode_image_dualpath(
    backbone: Backbone,
    x: torch.Tensor,
    first_vv_block: int,
    vv_taps: Sequence[int] = (),
    orig_taps: Sequence[int] = (),
    pos_interp: str = "bicubic",
) -> DualFeatures:
    """Normalised images [B, 3, H, W] -> :class:`DualFeatures`.

    Args:
        backbone: a frozen :class:`~clipad.backbone.Backbone`.
        x: [B, 3, H, W] CLIP-normalised images (H, W multiples of the patch size).
        first_vv_block: 1-based index of the first dual-path block; blocks before it run once
            (vanilla). ``depth + 1`` means no dual block: the V-V tokens are then the vanilla final
            tokens. AnoCLIP: ``first_block_of_last(depth, 12)``.
        vv_taps / orig_taps: 1-based blocks after which to keep each path's state.
        pos_interp: interpolation of the positional embedding at other resolutions.
    """
    depth = backbone.depth
    if not 1 <= first_vv_block <= depth + 1:
        raise ClipadError(f"first_vv_block={first_vv_block} out of range for '{backbone.name}' (1..{depth + 1})")
    bad = [layer for layer in (*vv_taps, *orig_taps) if not 1 <= layer <= depth]
    if bad:
        raise ClipadError(f"layers {bad} out of range for '{backbone.name}' (blocks 1..{depth})")
    emb, grid = backbone.embed(x, pos_interp)
    h = backbone.visual.ln_pre(emb)
    want_vv, want_orig = set(vv_taps), set(orig_taps)
    taps_vv: dict[int, torch.Tensor] = {}
    taps_orig: dict[int, torch.Tensor] = {}
    x_vv = h
    for i, blk in enumerate(backbone.blocks, start=1):
        if i < first_vv_block:
            h = residual_block(blk, h)
            x_vv = h
        else:
            h, x_vv = dual_block(blk, h, x_vv)
        if i in want_vv:
            taps_vv[i] = x_vv
        if i in want_orig:
            taps_orig[i] = h
    cls, _ = backbone.pool(h)
    return DualFeatures(
        cls=cls, vv_tokens=x_vv[:, 1:], orig_tokens=h[:, 1:], vv_taps=taps_vv, orig_taps=taps_orig, grid=grid
    )
