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

from .clip import Backbone, LayerHook, apply_layer_hook, image_rows, layer_at_fraction
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


# -- where the dual path starts ------------------------------------------------------------
# The official codes name the first dual-path block three ways; each method keeps its official
# option (so its flags read as the paper's) and converts it here. All three return the 1-based
# ``first_vv_block`` of :func:`encode_image_dualpath`; ``depth + 1`` means no dual block.


def first_block_of_last(depth: int, count: int) -> int:
    """``dual_path_blocks`` (AnoCLIP: "the last 12 blocks"): the number of last blocks run as dual
    path -> 1-based index of the first of them, clipped to block 1; depth + 1 when count is 0.
    12 of 24 -> block 13; 12 of 12 -> block 1."""
    if count < 0:
        raise ClipadError(f"the number of dual-path blocks must be >= 0; got {count}")
    return max(1, depth - count + 1)


def first_block_at_fraction(depth: int, dpam_start: float | None) -> int:
    """``dpam_start`` (AnomalyCLIP, TokenCLIP): the first dual-path block as a fraction of the
    depth, rounded as :meth:`Backbone.layer_index <clipad.backbones.clip.Backbone.layer_index>`
    rounds tap fractions (so one fraction names one block in both options) -> 1-based block.
    0.25 of 24 -> block 6 (the official ``DPAM_layer=20``); None -> depth + 1 (no dual path)."""
    if dpam_start is None:
        return depth + 1
    return layer_at_fraction(depth, _depth_fraction("dpam_start", dpam_start))


def first_block_of_dpam_layer(depth: int, dpam_layer: float | None) -> int:
    """``dpam_layer`` (AdaptCLIP): the official ``DPAM_layer`` as a fraction of the depth. The
    official code turns blocks -1 .. -(DPAM_layer - 1) into dual paths, i.e. the last
    ``round(dpam_layer x depth) - 1`` blocks -> :func:`first_block_of_last` of that count.
    20/24 of 24 -> block 6; of 12 -> block 4 (``DPAM_layer=10``); None -> depth + 1."""
    if dpam_layer is None:
        return depth + 1
    return first_block_of_last(depth, max(0, round(_depth_fraction("dpam_layer", dpam_layer) * depth) - 1))


def _depth_fraction(option: str, value: float) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise ClipadError(f"{option} must be a fraction of the depth in (0, 1] or None; got {value}")
    return float(value)


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
    layer_hook: LayerHook | None = None,
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
        layer_hook: called before each block as in :meth:`Backbone.encode_image
            <clipad.backbones.clip.Backbone.encode_image>` (0-based index, batch-first [B, L, W],
            extra tokens after the 1 + N image rows, taps and outputs without them), on the
            *original* path: the stream whose ``ln_1`` feeds both attentions. Up to the first
            dual block the V-V stream is that same state, hook included; after it, rows the hook
            appends join the V-V stream with the same values and rows it removes leave both,
            while edits of existing rows reach the V-V path only through the attention.
    """
    depth = backbone.depth
    if not 1 <= first_vv_block <= depth + 1:
        raise ClipadError(f"first_vv_block={first_vv_block} out of range for '{backbone.name}' (1..{depth + 1})")
    bad = [layer for layer in (*vv_taps, *orig_taps) if not 1 <= layer <= depth]
    if bad:
        raise ClipadError(f"layers {bad} out of range for '{backbone.name}' (blocks 1..{depth})")
    emb, grid = backbone.embed(x, pos_interp)
    h = backbone.visual.ln_pre(emb)
    n_tokens = 1 + grid[0] * grid[1]
    want_vv, want_orig = set(vv_taps), set(orig_taps)
    taps_vv: dict[int, torch.Tensor] = {}
    taps_orig: dict[int, torch.Tensor] = {}
    x_vv = h
    for i, blk in enumerate(backbone.blocks, start=1):
        if layer_hook is not None:
            h = apply_layer_hook(layer_hook, i - 1, h, n_tokens)
            x_vv = h if i <= first_vv_block else _follow_rows(x_vv, h)
        if i < first_vv_block:
            h = residual_block(blk, h)
            x_vv = h
        else:
            h, x_vv = dual_block(blk, h, x_vv)
        if i in want_vv:
            taps_vv[i] = image_rows(x_vv, n_tokens)
        if i in want_orig:
            taps_orig[i] = image_rows(h, n_tokens)
    h, x_vv = image_rows(h, n_tokens), image_rows(x_vv, n_tokens)
    cls, _ = backbone.pool(h)
    return DualFeatures(
        cls=cls, vv_tokens=x_vv[:, 1:], orig_tokens=h[:, 1:], vv_taps=taps_vv, orig_taps=taps_orig, grid=grid
    )


def _follow_rows(x_vv: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """V-V stream [B, L, W] -> [B, L', W] with the row count of the hooked original path
    ``h`` [B, L', W]: rows appended there are appended with their values, rows removed there
    are removed."""
    rows = x_vv.shape[1]
    if h.shape[1] == rows:
        return x_vv
    return torch.cat([x_vv, h[:, rows:]], dim=1) if h.shape[1] > rows else x_vv[:, : h.shape[1]]
