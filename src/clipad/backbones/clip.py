"""A frozen open_clip CLIP model seen as a token stream: any resolution, taps at any layers.

Methods never call open_clip directly; they ask a :class:`Backbone` for

- ``encode_image(x, layers=...)``: CLS embedding, final tokens and the residual stream after
  chosen blocks (``layers`` are 1-based block indices: layer 24 is the output of the last block
  of ViT-L/14); ``layer_hook=`` sees (and may replace or extend, e.g. with visual prompt
  tokens) the stream entering each block (0-based index);
- ``project(tokens)``: ``ln_post`` then ``proj``, i.e. tokens mapped into the joint space;
- ``encode_text(token_ids)`` / ``tokenize(texts)``.

Input resolutions other than the checkpoint's are handled by interpolating the positional
embedding on the fly (bicubic by default, as open_clip's ``resize_pos_embed``; methods whose
official code does otherwise pass ``pos_interp``).

Backbones are registered by name: ``tiny`` (a small random model for tests, defined in
``configs/tiny.json``) and every open_clip architecture whose image tower is a ViT with a
class token.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import weights as weights_mod
from .blocks import residual_block
from ..errors import ClipadError, ClipadWarning, InvalidTypeError, InvalidValueError, UnknownNameError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BUILTIN_BACKBONES = ("tiny",)


@dataclass
class ImageFeatures:
    """What one pass of the image tower gives.

    cls: [B, D] pooled token after ``ln_post`` and ``proj`` (the usual CLIP image embedding).
    tokens: [B, N, W] final patch tokens after ``ln_post`` (not projected), N = gh * gw.
    taps: layer -> [B, 1 + N, W] residual stream after that block (CLS first), un-normalised;
        rows a ``layer_hook`` appended after the patch tokens are not part of it.
    embeds: [B, 1 + N, W] token embeddings (patches + CLS + positions) before ``ln_pre``, when asked.
    grid: (gh, gw) patch grid.
    """

    cls: torch.Tensor
    tokens: torch.Tensor
    taps: dict[int, torch.Tensor] = field(default_factory=dict)
    embeds: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)


# hook(block index, tokens [B, L, W]) -> replacement tokens or None; see Backbone.encode_image
LayerHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def apply_layer_hook(hook: LayerHook, index: int, h: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Call ``hook(index, h)`` on the residual stream [B, L, W] entering block ``index``
    (0-based) -> the stream the block gets: ``h`` when the hook returns None, else its tensor,
    which must keep B and W and at least the ``n_tokens`` = 1 + N CLS and patch rows."""
    out = hook(index, h)
    if out is None:
        return h
    if not isinstance(out, torch.Tensor):
        raise InvalidTypeError(
            f"layer_hook returned a {type(out).__name__} before block {index}; return None (keep the tokens) "
            "or a tensor [B, L, W] that replaces them"
        )
    b, _, w = h.shape
    if out.ndim != 3 or out.shape[0] != b or out.shape[2] != w or out.shape[1] < n_tokens:
        raise InvalidValueError(
            f"layer_hook returned shape {tuple(out.shape)} before block {index}; it must be [{b}, L, {w}] with "
            f"L >= {n_tokens} (the CLS and patch rows first, extra tokens after them)"
        )
    return out


def image_rows(h: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[B, L, W] residual stream -> its first ``n_tokens`` = 1 + N rows (CLS, patches): the
    tokens a layer hook appended after the patches are dropped; no copy when there are none."""
    return h if h.shape[1] == n_tokens else h[:, :n_tokens]


def layer_at_fraction(depth: int, fraction: float) -> int:
    """1-based block at ``fraction`` of ``depth`` blocks, rounded and clipped to 1..depth
    (0.5 of 24 -> block 12, 0.25 -> 6, 1.0 -> 24)."""
    return max(1, min(depth, round(fraction * depth)))


class TowerFacts:
    """What every backbone family derives the same way from its ``depth`` and its ``mean`` /
    ``std`` buffers ([1, 3, 1, 1]): depth-relative layer choices and input normalisation."""

    depth: int
    mean: torch.Tensor
    std: torch.Tensor

    def layer_index(self, fraction: float) -> int:
        """A depth-relative layer choice: fraction 0.5 of a 24-block tower -> block 12."""
        return layer_at_fraction(self.depth, fraction)

    def tap_layers(self, fractions) -> tuple[int, ...]:
        """Depth fractions (e.g. (0.25, 0.5, 0.75, 1.0) = blocks 6/12/18/24 of 24) -> 1-based blocks."""
        taps = tuple(float(t) for t in fractions)
        if not taps or any(not 0.0 < t <= 1.0 for t in taps):
            raise ClipadError(f"taps must be fractions of the depth in (0, 1], e.g. (0.25, 0.5, 0.75, 1.0); got {taps}")
        return tuple(self.layer_index(t) for t in taps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised with the backbone's mean and std (CLIP's, ImageNet's)."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def list_backbones() -> list[str]:
    """``tiny`` plus every open_clip architecture name (not all have a ViT image tower)."""
    import open_clip

    return list(BUILTIN_BACKBONES) + list(open_clip.list_models())


def _tiny_config() -> dict:
    text = resources.files("clipad").joinpath("backbones/configs/tiny.json").read_text()
    return json.loads(text)


def _check_name(name: str) -> None:
    import open_clip

    if name in BUILTIN_BACKBONES:
        return
    if name in open_clip.list_models():
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        if not isinstance(vision.get("layers"), int) or vision.get("timm_model_name") or vision.get("attentional_pool"):
            raise ClipadError(
                f"backbone '{name}' has no plain ViT image tower (ResNet, timm or attention-pooled towers are not "
                "supported); clipad's methods need an open_clip VisionTransformer with a class token, e.g. "
                "ViT-B-16-plus-240 or ViT-L-14-336"
            )
        return
    vits = [m for m in open_clip.list_models() if m.startswith("ViT")]
    raise UnknownNameError(
        f"unknown backbone '{name}'. Valid names: {', '.join(BUILTIN_BACKBONES)}, or an open_clip "
        f"architecture such as {', '.join(vits)} (all: clipad.list_backbones())"
    )


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed

    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    resize_pos_embed(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise ClipadError(
            f"weights in '{origin}' do not fit this architecture: {' '.join(first[:3])[:600]}"
        ) from exc


def create_backbone(
    name: str,
    pretrained: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quick_gelu: bool | None = None,
    config_activation: bool = False,
    cache_dir: str | None = None,
) -> Backbone:
    """Build a frozen backbone.

    Args:
        name: ``tiny`` or an open_clip architecture (``ViT-B-16-plus-240``, ``ViT-L-14-336``...).
        pretrained: open_clip tag, path to a checkpoint file, or None for random weights.
        seed: seed of the random initialisation (used when ``pretrained`` is None, so that a
            saved detector with random weights is restored bit-identically).
        quick_gelu: run the MLPs with QuickGELU (True) or GELU (False); None (auto) decides from
            the architecture name (``-quickgelu``), the weights (OpenAI TorchScript archives and
            state dicts with ``input_resolution``; open_clip's record for a tag) and, for a file
            that does not say, the architecture's open_clip releases when they agree. Needed only
            for a plain state-dict file of an architecture whose releases use both (ViT-B-16,
            ViT-L-14...): True for OpenAI/MetaCLIP/DFN-trained weights, e.g. ``model.state_dict()``
            of OpenAI's code. A value that contradicts the name or the weights is an error
            (rules: :mod:`clipad.backbones.weights`).
        config_activation: run the activation the architecture's open_clip config names (GELU for
            ``ViT-L-14-336``) whatever the weights were trained with, and accept an explicit
            ``quick_gelu`` that contradicts the weights. A method quirk, not a user option: the
            official code of MuSc and AdaCLIP rebuilds CLIP from the JSON config and loads OpenAI's
            QuickGELU-trained weights into its GELU MLPs (methods ask for it through
            :meth:`clipad.methods.base.Detector.backbone_options`).

    Raises:
        InvalidValueError: ``quick_gelu`` contradicts the name or the weights.
        ClipadError: auto, and the activation of a weights file cannot be told.
    """
    import open_clip

    _check_name(name)
    source = weights_mod.resolve(name, pretrained, cache_dir=cache_dir) if name != "tiny" or pretrained else None
    state_dict, is_openai = (None, False)
    if source is not None and source.path is not None:
        state_dict, is_openai = weights_mod.read_state_dict(source.path)
    cfg = _tiny_config() if name == "tiny" else copy.deepcopy(open_clip.get_model_config(name))
    # '-quickgelu' architectures carry the flag in their config; it is passed once, below
    arch_quick_gelu = bool(cfg.pop("quick_gelu", False))
    use_quick_gelu = weights_mod.choose_quick_gelu(
        name, requested=quick_gelu, arch_quick_gelu=arch_quick_gelu, source=source, openai_file=is_openai,
        config_activation=config_activation,
    )
    if source is None or source.kind == "random":
        warnings.warn(
            f"backbone '{name}' uses randomly initialised weights (pretrained=None, seed={seed}): "
            "scores are meaningless for real inspection; pass an open_clip tag or a checkpoint file",
            ClipadWarning,
            stacklevel=3,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Built from the architecture config directly: open_clip.create_model would log a
        # "randomly initialised" warning through the root logger (configuring it as a side effect).
        custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
        model_cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
        model = model_cls(**cfg, quick_gelu=use_quick_gelu).eval()
    if state_dict is not None:
        _load_into(model, state_dict, str(source.path))

    mean, std = OPENAI_MEAN, OPENAI_STD
    if source is not None and source.tag:
        cfg = open_clip.get_pretrained_cfg(name, source.tag)
        mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    if name != "tiny":
        try:
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # noqa: BLE001 - HF tokenizers need a download; say so
            raise weights_mod.WeightsNotFound(f"the tokenizer of backbone '{name}' could not be loaded ({exc})") from exc
    bb = Backbone(model, name=name, pretrained=None if pretrained is None else str(pretrained), mean=mean, std=std, tokenizer=tokenizer)
    return bb.to(device)


class Backbone(TowerFacts, nn.Module):
    """A frozen CLIP whose image tower is an open_clip ``VisionTransformer`` with a class token."""

    def __init__(self, clip: nn.Module, *, name: str, pretrained: str | None, mean, std, tokenizer) -> None:
        super().__init__()
        visual = clip.visual
        needed = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post")
        if not all(hasattr(visual, a) for a in needed) or getattr(visual, "attn_pool", None) is not None:
            raise ClipadError(
                f"backbone '{name}' has a {type(visual).__name__} image tower; clipad's methods need an "
                "open_clip VisionTransformer with a class token (e.g. ViT-B-16, ViT-L-14-336)"
            )
        if getattr(visual, "pool_type", "tok") != "tok":
            raise ClipadError(f"backbone '{name}' pools with '{visual.pool_type}'; clipad needs class-token pooling")
        self.clip = clip.eval().requires_grad_(False)
        self.name = name
        self.pretrained = pretrained
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1] if self.visual.proj is not None else self.width

    @property
    def patch_size(self) -> tuple[int, int]:
        k = self.visual.conv1.kernel_size
        return (k, k) if isinstance(k, int) else tuple(k)

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def quick_gelu(self) -> bool:
        """True when the MLPs run QuickGELU (read from the model, so it is what actually runs).
        A saved detector needs it to be rebuilt as it ran: auto would decide again from evidence
        that may have changed (a moved or replaced weights file)."""
        from open_clip.transformer import QuickGELU

        return isinstance(getattr(self.blocks[0].mlp, "gelu", None), QuickGELU)

    # -- image tower ---------------------------------------------------------------------------
    def positional_embedding(self, grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
        """[1 + gh * gw, W] positional embedding for a patch grid, interpolated when it differs.

        ``mode="bicubic"`` is open_clip's ``resize_pos_embed`` (antialiased bicubic, whose kernel
        differs from plain bicubic even when upsampling), so the tower computes what open_clip's
        own model built at that resolution computes; ``"bicubic-plain"`` is plain bicubic (A = -0.75,
        no antialias), what older open_clip copies vendored by MuSc and AdaCLIP do; other modes
        are plain ``F.interpolate`` (``"bilinear"``, ``"nearest"``...).
        """
        pos = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            return pos
        g0h, g0w = self.native_grid
        cls_pos, grid_pos = pos[:1], pos[1:]
        grid_pos = grid_pos.reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic", "bicubic-plain") else {}
        if mode == "bicubic":
            kwargs["antialias"] = True
        mode = "bicubic" if mode == "bicubic-plain" else mode
        grid_pos = F.interpolate(grid_pos.float(), size=tuple(grid), mode=mode, **kwargs)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([cls_pos, grid_pos], dim=0)

    def embed(self, x: torch.Tensor, pos_interp: str = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images [B, 3, H, W] -> token embeddings [B, 1 + N, W] (before ``ln_pre``)."""
        ph, pw = self.patch_size
        if x.shape[-2] % ph or x.shape[-1] % pw:
            raise ClipadError(
                f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {ph}x{pw} of '{self.name}'"
            )
        v = self.visual
        tok = v.conv1(x.to(v.conv1.weight.dtype))
        grid = (tok.shape[-2], tok.shape[-1])
        tok = tok.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(tok.dtype).view(1, 1, -1).expand(tok.shape[0], -1, -1)
        tok = torch.cat([cls, tok], dim=1)
        return tok + self.positional_embedding(grid, pos_interp).to(tok.dtype), grid

    def run_blocks(self, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Apply blocks ``start .. stop-1`` (0-based) to a residual stream [B, L, W]."""
        for blk in self.blocks[start:stop]:
            h = residual_block(blk, h)
        return h

    def encode_image(
        self,
        x: torch.Tensor,
        layers: tuple[int, ...] | list[int] = (),
        *,
        keep_embeds: bool = False,
        pos_interp: str = "bicubic",
        layer_hook: LayerHook | None = None,
    ) -> ImageFeatures:
        """Normalised images [B, 3, H, W] -> :class:`ImageFeatures` with taps after ``layers``.

        ``layer_hook(index, tokens)``, when given, is called once per block **before** the block
        runs, with the 0-based block ``index`` and the batch-first residual stream ``tokens``
        [B, L, W] entering it: after ``ln_pre`` for index 0, else the un-normalised output of
        block ``index - 1``, i.e. what ``layers=(index,)`` taps (1-based). L = 1 + N (CLS first,
        then the N patches row-major) plus any tokens an earlier call appended. Returning None
        keeps the tokens; returning a tensor [B, L', W] replaces them. Before, not after, the
        block: visual prompt tokens (AdaCLIP, VPT-deep) are inserted into a block's input, and a
        hook at index k + 1 sees (and may edit) block k's output anyway.

        Extra tokens go **after** the 1 + N image rows (L' >= 1 + N, checked): they take part
        in the attention of every later block until a later call removes them, while the taps,
        the final tokens and the CLS embedding read the first 1 + N rows only, so callers never
        strip them. The tower is frozen, but autograd flows through the blocks into whatever the
        hook adds (learnable prompts) when called with gradients enabled. Without a hook the
        pass is the plain one.
        """
        bad = [l for l in layers if not 1 <= l <= self.depth]
        if bad:
            raise ClipadError(f"layers {bad} out of range for '{self.name}' (blocks 1..{self.depth})")
        emb, grid = self.embed(x, pos_interp)
        h = self.visual.ln_pre(emb)
        n_tokens = 1 + grid[0] * grid[1]
        taps: dict[int, torch.Tensor] = {}
        wanted = set(layers)
        for i, blk in enumerate(self.blocks):
            if layer_hook is not None:
                h = apply_layer_hook(layer_hook, i, h, n_tokens)
            h = residual_block(blk, h)
            if i + 1 in wanted:
                taps[i + 1] = image_rows(h, n_tokens)
        cls, tokens = self.pool(image_rows(h, n_tokens))
        return ImageFeatures(cls=cls, tokens=tokens, taps=taps, embeds=emb if keep_embeds else None, grid=grid)

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final residual stream [B, 1 + N, W] -> (CLS embedding [B, D], tokens [B, N, W]) as open_clip pools."""
        pooled, tokens = self.visual._pool(h)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled, tokens

    def encode_sequences(self, emb: torch.Tensor) -> torch.Tensor:
        """Run the whole tower on token sequences [S, L, W] (CLS first, before ``ln_pre``) -> [S, D]."""
        h = self.run_blocks(self.visual.ln_pre(emb))
        return self.pool(h)[0]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., W] residual-stream tokens -> [..., D] joint-space tokens (``ln_post`` then ``proj``)."""
        out = self.visual.ln_post(tokens)
        return out @ self.visual.proj if self.visual.proj is not None else out

    # -- text tower ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """[T] strings -> [T, context_length] token ids on the backbone's device."""
        return self.tokenizer(texts).to(self.device)

    def encode_text(
        self, token_ids: torch.Tensor, *, layer_hook: LayerHook | None = None, min_length: int = 0
    ) -> torch.Tensor:
        """[T, L] token ids -> [T, D] text embeddings (not normalised).

        With a causal mask and pooling at the end-of-text token (the argmax id), positions after
        the last EOT cannot influence the result, so the sequence is cut there: prompts of ~15
        tokens then cost a fifth of the full 77-token context.

        ``layer_hook(index, x)``, when given, is called before each text block (0-based
        ``index``) with the batch-first hidden states ``x`` [T, L', W] (token embeddings plus
        positions for index 0) and returns None (keep) or a tensor of the same shape that
        replaces them, e.g. with learned prompt vectors written over some positions (AdaCLIP's
        text prompts). ``min_length``: keep at least that many positions in the cut sequence
        (a hook that writes positions 1..M needs ``min_length = M + 1``, else a short sentence
        would be cut before them, or its EOT overwritten where the full context would not).
        """
        clip = self.clip
        standard = getattr(clip, "text_pool_type", None) == "argmax" and getattr(clip, "attn_mask", None) is not None
        if not standard:
            if layer_hook is not None:
                raise ClipadError(f"backbone '{self.name}' has no causal argmax-pooled text tower; text layer hooks need one")
            return clip.encode_text(token_ids)
        eot = token_ids.argmax(dim=-1)
        length = min(max(int(eot.max()) + 1, int(min_length)), token_ids.shape[1])
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(token_ids[:, :length]).to(cast) + clip.positional_embedding[:length].to(cast)
        mask = clip.attn_mask[:length, :length]
        if layer_hook is None:
            return self.pool_text(clip.transformer(x, attn_mask=mask), eot)
        tower = clip.transformer
        batch_first = getattr(tower, "batch_first", True)
        for i, blk in enumerate(tower.resblocks):
            out = layer_hook(i, x)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise InvalidValueError(
                        f"text layer_hook returned {got} before block {i}; return None or a tensor of shape {tuple(x.shape)}"
                    )
                x = out
            x = blk(x, attn_mask=mask) if batch_first else blk(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        return self.pool_text(x, eot)

    def pool_text(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Final text-tower states [T, L, W] and EOT positions [T] -> [T, D] text embeddings
        (``ln_final`` at the EOT token, then ``text_projection``), as open_clip pools them."""
        clip = self.clip
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj
