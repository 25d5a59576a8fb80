"""Learnable text prompts pushed through a frozen CLIP text tower.

Prompt learning in the CoOp style, as AnomalyCLIP and AdaptCLIP use it: each prompt is a text
such as ``"{} damaged object."`` whose ``{}`` is a run of ``n_ctx`` placeholder words. The
placeholder is tokenised like any text; its token embeddings (right after the start token) are
then replaced by ``n_ctx`` learned vectors, and the sequence goes through the frozen text
transformer, ``ln_final``, pooling at the end-of-text token and the text projection.

AnomalyCLIP adds *deep* text prompts: in transformer layers 2 .. ``deep_depth`` (1-based) of the
text tower, the hidden states at positions 1 .. ``deep_length`` (the first ``deep_length`` context
slots) are overwritten, before the layer runs, by that layer's own learned vectors (no positional
embedding is added to them). Layer 1 sees the context vectors. With ``deep_depth = 9`` and
``deep_length = 4`` (the paper's setting) there are 8 sets of 4 vectors for layers 2..9 of a
12-layer tower. A tower with fewer layers uses the first ``layers - 1`` sets; the module only
creates that many.

Quirk kept by default (``deep_fp16=True``): the official code casts each deep prompt to float16
before splicing it into the float32 stream, so the vectors (and their gradients) are rounded to
half precision. ``deep_fp16=False`` splices them at full precision.

The official model also creates ``compound_prompt_projections`` (one Linear per deep set) that
never enter the computation; they are not modelled here (``clipad convert`` drops them).

AdaptCLIP's textual adapter is ``LearnablePrompts(backbone, ("{}.", "{}."), n_ctx=12)`` (no
class word, no deep prompts).

Like :meth:`clipad.backbone.Backbone.encode_text`, the sequence is cut after the last
end-of-text token: under the causal mask, later positions cannot change the pooled output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..backbones.clip import Backbone
from ..errors import ClipadError, shorten

PLACEHOLDER = "X"
# (normal, abnormal) object-agnostic learned prompts: "object" stands for every class
OBJECT_AGNOSTIC_PROMPTS = ("{} object.", "{} damaged object.")


def encode_prompt_embeddings(
    backbone: Backbone,
    embeddings: torch.Tensor,
    eot: torch.Tensor,
    deep: torch.Tensor | None = None,
    deep_fp16: bool = True,
) -> torch.Tensor:
    """Run token embeddings through the frozen text tower, with optional deep prompts.

    Args:
        backbone: a :class:`~clipad.backbone.Backbone` whose CLIP has an open_clip text
            transformer (``token_embedding``, ``positional_embedding``, ``transformer``,
            ``ln_final``, ``text_projection``, causal ``attn_mask``).
        embeddings: [P, L, W] token embeddings (positions not added yet), L <= context length.
        eot: [P] index of each prompt's end-of-text token (< L).
        deep: [K, T, W] deep prompts: before layer k + 2 (1-based; k = 0 .. K - 1), positions
            1 .. T are replaced by ``deep[k]``. K must be below the number of layers.
        deep_fp16: round the deep prompts to float16 before splicing (the official quirk).
    Returns:
        [P, D] text embeddings (not normalised), differentiable w.r.t. ``embeddings`` and ``deep``.
    """
    clip = backbone.clip
    tower = getattr(clip, "transformer", None)
    if tower is None or getattr(clip, "attn_mask", None) is None:
        raise ClipadError(
            f"backbone '{backbone.name}' has no causal open_clip text transformer; learnable prompts need one"
        )
    blocks = tower.resblocks
    if deep is not None and deep.shape[0] >= len(blocks):
        raise ClipadError(f"{deep.shape[0]} deep prompt sets need more than the {len(blocks)} text layers of '{backbone.name}'")
    length = embeddings.shape[1]
    cast = tower.get_cast_dtype()
    x = embeddings.to(cast) + clip.positional_embedding[:length].to(cast)
    mask = clip.attn_mask[:length, :length]
    batch_first = getattr(tower, "batch_first", True)
    n_deep = 0 if deep is None else deep.shape[0]
    for i, blk in enumerate(blocks):
        if 1 <= i <= n_deep:
            ctx = deep[i - 1].unsqueeze(0).expand(x.shape[0], -1, -1)
            if deep_fp16:
                # rounded after the expansion, as the official code: the gradient is then rounded
                # per prompt before the prompts' contributions are summed, which matters where
                # they nearly cancel
                ctx = ctx.to(torch.float16)
            ctx = ctx.to(x.dtype)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + ctx.shape[1] :]], dim=1)
        if batch_first:
            x = blk(x, attn_mask=mask)
        else:  # sequence-first towers (older open_clip)
            x = blk(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return backbone.pool_text(x, eot)


class LearnablePrompts(nn.Module):
    """Learned context vectors (and optional deep prompts) for a fixed list of prompt texts.

    Args:
        backbone: the frozen backbone (used here only to tokenise; it is not stored).
        texts: P prompt texts, each starting with ``{}``, the place of the ``n_ctx`` context
            vectors, e.g. ``("{} object.", "{} damaged object.")``.
        n_ctx: context vectors per prompt.
        deep_depth: AnomalyCLIP's ``learnabel_text_embedding_depth``: deep prompts in layers
            2 .. deep_depth; 0 or 1 = none.
        deep_length: vectors per deep set (positions 1 .. deep_length).
        deep_fp16: see the module docstring.
        init_std: standard deviation of the N(0, std) initialisation (0.02, as CoOp).
        seed: seed of that initialisation.

    Parameters: ``ctx`` [P, n_ctx, W]; ``deep`` [K, deep_length, W] when K > 0, with
    K = min(deep_depth, text layers) - 1.
    """

    def __init__(
        self,
        backbone: Backbone,
        texts: Sequence[str],
        n_ctx: int,
        *,
        deep_depth: int = 0,
        deep_length: int = 0,
        deep_fp16: bool = True,
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ClipadError(f"n_ctx must be >= 1; got {n_ctx}")
        bad = [t for t in texts if not t.startswith("{}")]
        if not texts or bad:
            raise ClipadError(f"prompt texts must start with '{{}}' (the context slot); got {list(bad) or 'none'}")
        clip = backbone.clip
        width = clip.ln_final.weight.shape[0]
        layers = len(clip.transformer.resblocks)
        n_deep = max(0, min(int(deep_depth), layers) - 1) if deep_length > 0 else 0
        if n_deep and deep_length > n_ctx:
            raise ClipadError(f"deep_length={deep_length} exceeds n_ctx={n_ctx}: deep prompts replace context slots")
        self.texts = tuple(texts)
        self.n_ctx = int(n_ctx)
        self.deep_length = int(deep_length) if n_deep else 0
        self.deep_fp16 = bool(deep_fp16)
        self.init_std = float(init_std)

        filled = [t.format(" ".join([PLACEHOLDER] * n_ctx)) for t in texts]
        ids = backbone.tokenizer(filled).cpu()
        placeholder = backbone.tokenizer([PLACEHOLDER]).cpu()[0, 1]
        if not bool((ids[:, 1 : 1 + n_ctx] == placeholder).all()):
            raise ClipadError(f"the tokenizer of '{backbone.name}' does not give one token per context slot in "
                              f"{shorten(filled, 200)} (n_ctx={n_ctx} leaves no room in the text context?)")
        eot = ids.argmax(dim=-1)
        length = int(eot.max()) + 1
        self.register_buffer("token_ids", ids[:, :length].contiguous(), persistent=False)
        self.register_buffer("eot", eot, persistent=False)

        self.ctx = nn.Parameter(torch.empty(len(texts), n_ctx, width))
        self.deep = nn.Parameter(torch.empty(n_deep, self.deep_length, width)) if n_deep else None
        self.reset_parameters(seed)

    @property
    def n_deep(self) -> int:
        return 0 if self.deep is None else self.deep.shape[0]

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Redraw every vector from N(0, init_std) with a generator seeded by ``seed``."""
        g = torch.Generator().manual_seed(int(seed))
        for p in (self.ctx, self.deep):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) * self.init_std)

    def embeddings(self, backbone: Backbone) -> torch.Tensor:
        """[P, L, W] token embeddings with the context vectors in place (before positions)."""
        emb = backbone.clip.token_embedding(self.token_ids)
        ctx = self.ctx.to(emb.dtype)
        return torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)

    def forward(self, backbone: Backbone) -> torch.Tensor:
        """-> [P, D] text embeddings (not normalised) of the prompts, in ``texts`` order."""
        return encode_prompt_embeddings(backbone, self.embeddings(backbone), self.eot, self.deep, self.deep_fp16)
