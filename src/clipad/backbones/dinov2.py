"""A frozen DINOv2 ViT (timm's modules) seen as a token stream: any resolution, taps at any layers.

The second backbone family, next to CLIP (:mod:`.clip`). The surface methods use is the same:
``encode_image(x, layers=...)`` -> :class:`~clipad.backbones.clip.ImageFeatures`, ``normalize``,
``depth``, ``width``, ``patch_size``, ``native_grid``, ``tap_layers``, ``layer_index``... There is
no text tower: ``tokenize`` / ``encode_text`` raise a :class:`~clipad.errors.ClipadError`.

Names (``configs/dinov2.json``): the official torch.hub names ``dinov2_vits14``, ``dinov2_vitb14``,
``dinov2_vitl14``, ``dinov2_vitg14`` and their ``_reg`` variants (4 register tokens), built as the
timm architectures ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2``; and ``tiny-dinov2``, a
small random model for tests (depth 4, width 32, patch 16 like clipad's tiny CLIP).

What the forward computes is the official ``DinoVisionTransformer.get_intermediate_layers(x, n=1,
norm=True)`` of facebookresearch/dinov2 (``dinov2/models/vision_transformer.py``):

- patch embedding (a patch-size convolution with bias), CLS token, positional embedding, then the
  register tokens right after CLS (registers get no positional embedding);
- at a patch grid other than the native 37 x 37 (518 px) the positional grid is interpolated as
  the official ``interpolate_pos_encoding`` does it, not as timm's ``resample_abs_pos_embed``:
  bicubic (A = -0.75) with ``scale_factor = ((gh + 0.1) / 37, (gw + 0.1) / 37)`` and no antialias
  for the plain models (``interpolate_offset=0.1``: the output size floors to (gh, gw) but the
  sampling positions follow the offset scale), and ``size=(gh, gw)`` with antialias for the
  ``_reg`` models (the hub builds them with ``interpolate_offset=0``, ``interpolate_antialias=True``).
  The official code also skips the interpolation only when the grid is the native one;
- blocks ``x += ls1 * attn(norm1 x)``, ``x += ls2 * mlp(norm2 x)`` (LayerNorm eps 1e-6, exact
  GELU; SwiGLU for ViT-g), then the final ``norm``. ``tokens`` are the normed patch tokens,
  ``cls`` the normed CLS token, ``taps[l]`` the un-normed residual stream after 1-based block l,
  CLS first and register tokens removed: [B, 1 + N, W].

Weights (``pretrained``, resolved by :func:`resolve_weights`):

- None: random, seeded (a :class:`~clipad.errors.ClipadWarning` says so); layer-scale gammas start
  at 1.0 as the official hub builder makes them (timm's default is 1e-5, which would make a random
  model nearly the identity);
- a file: the official ``.pth`` (``dinov2_vits14_pretrain.pth``, state-dict keys of the dinov2 repo,
  converted by :func:`convert_official_state_dict`), a timm ``.safetensors`` / ``.bin``, or any
  state dict in either layout; read tensor-only (``torch.load(weights_only=True)``);
- the tag ``lvd142m`` (the only release): the official ``.pth`` from torch.hub's cache
  (``~/.cache/torch/hub/checkpoints``, where the official code's ``torch.hub.load`` leaves it), else
  timm's Hugging Face copy (``timm/<arch>.lvd142m``) from the local Hugging Face cache, else
  downloaded once from the hub; ``hf-hub:<repo>`` names another Hugging Face repo in timm's layout.
  Offline with nothing cached: :class:`~clipad.errors.WeightsNotFound` within seconds.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import weights as weights_mod
from .clip import ImageFeatures, LayerHook, TowerFacts, apply_layer_hook, image_rows
from ..errors import ClipadError, ClipadWarning, InvalidValueError, UnknownNameError, WeightsNotFound

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the one release of the DINOv2 weights (timm's tag; the official files carry no tag)
DEFAULT_TAG = "lvd142m"
TINY = "tiny-dinov2"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/"


@dataclass(frozen=True)
class DinoV2Config:
    """Shape of a DINOv2 ViT and the official hub builder's settings.

    timm: the timm architecture name (None: built from the numbers, e.g. ``tiny-dinov2``);
    ffn: "mlp" (GELU MLP, ratio 4) or "swiglu" (ViT-g); registers: register tokens (0 or 4);
    interpolate_offset / interpolate_antialias: the positional-embedding resize of the official
    ``interpolate_pos_encoding``; file: the official checkpoint path under :data:`OFFICIAL_URL`.
    """

    width: int
    depth: int
    heads: int
    patch_size: int = 14
    img_size: int = 518
    ffn: str = "mlp"
    registers: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    timm: str | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        if self.ffn not in ("mlp", "swiglu"):
            raise InvalidValueError(f"DinoV2Config.ffn must be 'mlp' or 'swiglu'; got {self.ffn!r}")
        if self.width % self.heads or min(self.width, self.depth, self.heads, self.patch_size, self.img_size) < 1:
            raise InvalidValueError(f"DinoV2Config needs positive sizes with width divisible by heads; got {self}")
        if self.img_size % self.patch_size:
            raise InvalidValueError(f"DinoV2Config.img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")


@cache
def _configs() -> dict[str, DinoV2Config]:
    text = resources.files("clipad").joinpath("backbones/configs/dinov2.json").read_text()
    raw = json.loads(text)
    return {name: DinoV2Config(**cfg) for name, cfg in raw.items() if not name.startswith("_")}


def list_dinov2() -> list[str]:
    """DINOv2 backbone names: ``tiny-dinov2`` and the official hub names."""
    names = list(_configs())
    return [TINY] + [n for n in names if n != TINY]


def is_dinov2(name: str) -> bool:
    return name in _configs()


def dinov2_config(name: str) -> DinoV2Config:
    try:
        return _configs()[name]
    except KeyError:
        raise UnknownNameError(f"unknown DINOv2 backbone '{name}'. Valid names: {', '.join(list_dinov2())}") from None


# --------------------------------------------------------------------------- weights


def convert_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict of the official dinov2 code (``DinoVisionTransformer``, torch.hub ``.pth``) ->
    timm's ``VisionTransformer`` layout; a timm-layout dict is returned unchanged.

    - ``mask_token`` (used only for masked-image training) is dropped;
    - register models: ``register_tokens`` -> ``reg_token``; timm adds no positional embedding to
      CLS and registers (``no_embed_class``), so the CLS row of ``pos_embed`` is folded into
      ``cls_token`` (the official forward adds it to CLS in every pass: the same sum) and removed;
    - SwiGLU (ViT-g): ``mlp.w12`` -> ``mlp.fc1``, ``mlp.w3`` -> ``mlp.fc2`` (same packing);
    - chunked block lists (``blocks.<chunk>.<i>.``, ``block_chunks > 0`` when training) are flattened.
    """
    official = "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd)
    if not official:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 3 and parts[1].isdigit() and parts[2].isdigit():
            key = ".".join(["blocks", parts[2], *parts[3:]])  # blocks.<chunk>.<i>.x -> blocks.<i>.x
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out.pop("pos_embed")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _offline_message(name: str, tag: str, why: str, cli: bool) -> str:
    local = f"--pretrained /path/to/{name}_pretrain.pth" if cli else f"pretrained='/path/to/{name}_pretrain.pth'"
    random = "--pretrained none" if cli else "pretrained=None"
    return (
        f"no cached weights for backbone '{name}' with pretrained tag '{tag}', and {why}. Download them once on a "
        f"connected machine (timm's Hugging Face repo lands in ~/.cache/huggingface; torch.hub's official file in "
        f"~/.cache/torch/hub/checkpoints), or pass a local file: {local} (the official .pth from "
        f"{OFFICIAL_URL}, or a timm .safetensors), or {random} for random weights."
    )


def _cached_weights(cfg: DinoV2Config, tag: str, cache_dir: str | None) -> Path | None:
    """The official ``.pth`` in torch.hub's cache (where the official code's ``torch.hub.load``
    leaves it), if there; timm's Hugging Face copy is looked up by :func:`_hub_weights`."""
    if cfg.file:
        hub_dir = Path(os.environ.get("TORCH_HOME", os.path.expanduser("~/.cache/torch"))) / "hub" / "checkpoints"
        local = hub_dir / os.path.basename(cfg.file)
        if local.is_file():
            return local
    return None


def resolve_weights(name: str, pretrained: str | os.PathLike | None, cache_dir: str | None = None) -> Path | None:
    """``pretrained`` -> a local weights file (None = random init); see the module docstring.

    Raises:
        WeightsNotFound: the tag is neither cached nor downloadable (offline), or the path is a directory.
        UnknownNameError: a string that is neither a file nor a tag.
    """
    if pretrained is None:
        return None
    as_path = Path(os.path.expanduser(str(pretrained)))
    if as_path.is_file():
        return as_path
    if as_path.exists():
        raise WeightsNotFound(f"pretrained weights '{pretrained}' name a directory, not a checkpoint file")
    tag = str(pretrained)
    if tag.startswith("hf-hub:"):  # a Hugging Face repo in timm's layout, e.g. hf-hub:timm/<arch>.lvd142m
        return _hub_weights(name, tag, tag[len("hf-hub:"):], cache_dir)
    cfg = dinov2_config(name)
    if tag != DEFAULT_TAG or cfg.timm is None:
        if os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise WeightsNotFound(f"pretrained checkpoint file '{tag}' does not exist")
        tags = DEFAULT_TAG if cfg.timm else "(none: pass a local file)"
        raise UnknownNameError(f"'{tag}' is neither a file nor a pretrained tag of '{name}'; tags for '{name}': {tags}")
    cached = _cached_weights(cfg, tag, cache_dir)
    if cached is not None:
        return cached
    return _hub_weights(name, tag, f"timm/{cfg.timm}.{tag}", cache_dir)


def _hub_weights(name: str, tag: str, repo_id: str, cache_dir: str | None) -> Path:
    """``repo_id``'s weights from the Hugging Face cache, else downloaded once; offline: fast
    :class:`WeightsNotFound` (one reachability probe, no retries)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)

    def offline(why: str) -> WeightsNotFound:
        return WeightsNotFound(_offline_message(name, tag, why, cli=False), backbone=name, tag=tag, reason=why,
                               cli_message=_offline_message(name, tag, why, cli=True))

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("CLIPAD_OFFLINE", "") not in ("", "0"):
        raise offline("offline mode is set (HF_HUB_OFFLINE/CLIPAD_OFFLINE)")
    if not weights_mod._host_reachable():
        raise offline(f"{weights_mod.HF_HOST} cannot be reached (no network?)")
    try:
        from huggingface_hub import hf_hub_download

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        return Path(hf_hub_download(repo_id, "model.safetensors", cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - report any download failure the same way
        raise offline(f"the download of {repo_id} failed ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- construction


def _timm_kwargs(cfg: DinoV2Config) -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
        num_classes=0, init_values=1.0, reg_tokens=cfg.registers, no_embed_class=cfg.registers > 0,
    )
    if cfg.ffn == "swiglu":
        # timm packs the official SwiGLU (w12 -> fc1, w3 -> fc2); hidden 2 x 4096 for width 1536
        hidden = (int(cfg.width * 4 * 2 / 3) + 7) // 8 * 8
        kwargs.update(mlp_ratio=2 * hidden / cfg.width, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return kwargs


def build_dinov2(cfg: DinoV2Config, *, seed: int = 0) -> nn.Module:
    """A timm ``VisionTransformer`` of shape ``cfg``, randomly initialised from ``seed``
    (layer-scale gammas 1.0, as the official hub builder)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(**_timm_kwargs(cfg))
    return model.eval()


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Copy a state dict (official or timm layout) into ``model``, strictly."""
    sd = convert_official_state_dict(state_dict)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).splitlines()[:3])[:600]
        raise ClipadError(f"weights in '{origin}' do not fit this DINOv2 architecture: {first}") from exc


def create_dinov2_backbone(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quick_gelu: bool | None = None,
    config_activation: bool = False,
    cache_dir: str | None = None,
    config: DinoV2Config | None = None,
) -> DinoV2Backbone:
    """Build a frozen DINOv2 backbone.

    Args:
        name: a name of :func:`list_dinov2` (``dinov2_vits14``, ``dinov2_vitb14_reg``, ``tiny-dinov2``...).
        pretrained: ``"lvd142m"``, a weights file, or None (random weights, seeded by ``seed``).
        config: build this shape instead of the named one (``name`` is then only recorded), e.g.
            a small random model in the official layout for fidelity tests.
        quick_gelu / config_activation: CLIP-only settings, accepted so that one factory serves
            both families; ``quick_gelu=True`` is an error (DINOv2 runs exact GELU).

    Raises:
        UnknownNameError: an unknown name or tag. WeightsNotFound: offline and not cached.
    """
    if quick_gelu:
        raise InvalidValueError(f"quick_gelu=True does not apply to the DINOv2 backbone '{name}' (it runs exact GELU); drop it")
    cfg = config if config is not None else dinov2_config(name)
    path = resolve_weights(name, pretrained, cache_dir=cache_dir)
    state_dict = weights_mod.read_state_dict(path)[0] if path is not None else None
    if path is None:
        warnings.warn(
            f"backbone '{name}' uses randomly initialised weights (pretrained=None, seed={seed}): "
            "scores are meaningless for real inspection; pass pretrained='lvd142m' or a checkpoint file",
            ClipadWarning,
            stacklevel=3,
        )
    model = build_dinov2(cfg, seed=seed)
    if state_dict is not None:
        load_weights(model, state_dict, str(path))
    bb = DinoV2Backbone(model, cfg, name=name, pretrained=None if pretrained is None else str(pretrained))
    return bb.to(device)


class DinoV2Backbone(TowerFacts, nn.Module):
    """A frozen DINOv2 ViT (timm modules) behind clipad's backbone surface; see the module docstring."""

    family = "dinov2"

    def __init__(self, model: nn.Module, config: DinoV2Config, *, name: str, pretrained: str | None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.name = name
        self.pretrained = pretrained
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def embed_dim(self) -> int:
        """Width of ``cls`` and ``tokens`` (no projection head: the width)."""
        return self.config.width

    @property
    def patch_size(self) -> tuple[int, int]:
        return (self.config.patch_size, self.config.patch_size)

    @property
    def native_grid(self) -> tuple[int, int]:
        g = self.config.img_size // self.config.patch_size
        return (g, g)

    @property
    def num_registers(self) -> int:
        return self.config.registers

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.proj.weight.device

    @property
    def quick_gelu(self) -> bool:
        """False: DINOv2 runs exact GELU (SwiGLU for ViT-g), never CLIP's QuickGELU; saved
        detectors record it as for CLIP backbones."""
        return False

    # -- image tower ---------------------------------------------------------------------------

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """[gh * gw, W] positional embedding of the patch grid, resized as the official
        ``interpolate_pos_encoding`` resizes it (module docstring); CLS's row is not included."""
        pos = self.model.pos_embed[0]
        grid_pos = pos if self.model.no_embed_class else pos[1:]
        if tuple(grid) == self.native_grid:
            return grid_pos
        m = self.native_grid[0]
        dtype = grid_pos.dtype
        g = grid_pos.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            # scale_factor, not size: the official "+0.1" kludge moves the sampling positions
            scale = (float(grid[0] + offset) / m, float(grid[1] + offset) / m)
            g = F.interpolate(g, scale_factor=scale, mode="bicubic", antialias=self.config.interpolate_antialias)
        else:
            g = F.interpolate(g, size=tuple(grid), mode="bicubic", antialias=self.config.interpolate_antialias)
        if tuple(g.shape[-2:]) != tuple(grid):  # cannot happen for offsets in [0, 1); guards odd configs
            raise ClipadError(f"positional embedding resized to {tuple(g.shape[-2:])}, expected {tuple(grid)}")
        return g.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(dtype)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images [B, 3, H, W] -> token embeddings [B, 1 + R + N, W] (CLS, R registers,
        patches) entering block 0, and the patch grid."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ClipadError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {p}x{p} of '{self.name}'")
        m = self.model
        tok = m.patch_embed.proj(x.to(m.patch_embed.proj.weight.dtype))
        grid = (tok.shape[-2], tok.shape[-1])
        tok = tok.flatten(2).transpose(1, 2)
        pos = self.positional_embedding(grid).to(tok.dtype)
        b = tok.shape[0]
        cls = m.cls_token.to(tok.dtype).expand(b, -1, -1)
        if not m.no_embed_class:  # timm's _reg layout has CLS's positional row folded into cls_token
            cls = cls + m.pos_embed[:, :1].to(tok.dtype)
        parts = [cls, tok + pos]
        if m.reg_token is not None:  # registers go right after CLS, without a positional embedding
            parts.insert(1, m.reg_token.to(tok.dtype).expand(b, -1, -1))
        return torch.cat(parts, dim=1), grid

    def encode_image(
        self,
        x: torch.Tensor,
        layers: tuple[int, ...] | list[int] = (),
        *,
        keep_embeds: bool = False,
        layer_hook: LayerHook | None = None,
        pos_interp: str | None = None,
    ) -> ImageFeatures:
        """Normalised images [B, 3, H, W] (H, W multiples of the patch size) -> ImageFeatures:
        ``cls`` [B, W] and ``tokens`` [B, N, W] after the final norm, ``taps[l]`` [B, 1 + N, W]
        the residual stream after 1-based block l (CLS first, registers removed), ``grid``.

        ``layer_hook(index, tokens)`` sees the stream [B, 1 + R + N (+ extra), W] entering each
        block, as for CLIP (:meth:`clipad.backbones.clip.Backbone.encode_image`). ``pos_interp``
        (the CLIP backbone's choice of positional resize) is accepted and ignored: DINOv2 resizes
        its positional embedding one way only, the official one of its hub builder.
        """
        bad = [l for l in layers if not 1 <= l <= self.depth]
        if bad:
            raise ClipadError(f"layers {bad} out of range for '{self.name}' (blocks 1..{self.depth})")
        h, grid = self.embed(x)
        emb = h
        r = self.config.registers
        n_tokens = 1 + r + grid[0] * grid[1]
        taps: dict[int, torch.Tensor] = {}
        wanted = set(layers)
        for i, blk in enumerate(self.blocks):
            if layer_hook is not None:
                h = apply_layer_hook(layer_hook, i, h, n_tokens)
            h = blk(h)
            if i + 1 in wanted:
                rows = image_rows(h, n_tokens)
                taps[i + 1] = torch.cat([rows[:, :1], rows[:, 1 + r:]], dim=1) if r else rows
        out = self.model.norm(image_rows(h, n_tokens))
        return ImageFeatures(cls=out[:, 0], tokens=out[:, 1 + r:], taps=taps,
                             embeds=emb if keep_embeds else None, grid=grid)

    # -- no text tower -------------------------------------------------------------------------
    def _no_text(self) -> ClipadError:
        return ClipadError(
            f"backbone '{self.name}' is a DINOv2 image model without a text tower; methods that use text prompts "
            "need a CLIP backbone (e.g. ViT-B-16-plus-240, or 'tiny')"
        )

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise self._no_text()

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        raise self._no_text()

