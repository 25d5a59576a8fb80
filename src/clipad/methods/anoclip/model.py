"""AnoCLIP (a.k.a. AnoVL; Deng et al., arXiv 2308.15939): training-free zero-shot anomaly
localisation with a frozen CLIP, and "AnoCLIP+" with test-time adaptation (``tta=True``).

Behaviour follows the official code (hq-deng/AnoVL @ 3a70bfd):

- local tokens from the value-value dual path of the last 12 blocks (:mod:`clipad.dualpath`),
  ``ln_post`` then ``proj``; the CLS embedding from the original (vanilla) path;
- text: 7 antonym state pairs x 22 template frames x 3 domain phrases (objects vs textures), the
  normalised mean of raw sentence embeddings (:mod:`clipad.prompts_anoclip`);
- no temperature: every (normal, abnormal) softmax is over raw cosines;
- pixel map: abnormal probability per token, 3x3 box filter with replicate padding on the patch
  grid, bilinear upsampling (align_corners=True); no Gaussian;
- image score: the CLS probability, averaged over 22 views (identity, 8 rotations, 8 translations,
  horizontal flip, greyscale, rot90 x3) as the official MVTec AD script does;
- non-square inputs (the VisA script): shorter side resized to the model size, two overlapping
  square tiles (more when the aspect ratio is 2 or larger), maps stitched with the overlap
  averaged, image score averaged over tiles;
- TTA: a residual adapter on the projected V-V tokens (text-embedding adapter with tanh, or a
  plain linear one), re-initialised per image, trained 5 AdamW steps (lr 1e-3, wd 0.01) on
  entropy(clean) + 0.5 x (CE(noisy -> abnormal) + CE(clean -> normal)) with Gaussian noise
  sigma 0.055 on the un-normalised tokens; tiled images compute that loss on the stitched
  full-resolution logits, as the VisA script does. TTA never changes image scores.

Quirks and where they are handled:

- the official script keeps each class's AdamW state across images (results depend on image
  order) and draws from the global RNG. Default here: every image gets a fresh optimiser and the
  same seeded random stream (``tta_seed``), so results do not depend on order or batch; all
  images of a batch adapt at once (independent adapters, one batched computation).
  ``official_compat=True`` reproduces the official behaviour exactly: images one at a time in
  input order, AdamW state kept per class, one random stream (``tta_rng``) consumed in the
  official order (view permutation, adapter init, one noise draw per step);
- rot90 views use exact ``torch.rot90``; the official code rotates through kornia's bilinear
  warp, which differs by up to ~2e-4 per pixel (no visible effect on scores, see the fixtures);
- the official per-layer token list is corrupted by in-place aliasing, but only its final-layer
  V-V tokens are used; clipad computes those directly (see :mod:`clipad.dualpath`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.clip import Backbone
from ...backbones.dualpath import encode_image_dualpath, first_block_of_last
from ...errors import ClipadError
from ...components.scoring import cosine_logits, state_probabilities
from .prompts import DOMAIN_PHRASES, encode_prompt_set, prompt_class_name, resolve_domain
from ..base import Detector
from ..registry import register_method
from .options import AnoCLIPOptions

ADAPTERS = ("text", "linear")
N_VIEWS = 22
# The 16 affine views of the official MVTec AD test-time augmentation, in its order.
ROTATIONS = tuple(k * math.pi / 16 for k in (-4, -3, -2, -1, 1, 2, 3, 4))
TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
GREY_WEIGHTS = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------- pure functions


def view_affines() -> torch.Tensor:
    """[16, 2, 3] float32 affine matrices (8 rotations, then 8 translations in normalised units).

    Rotations are computed in float64 and rounded once, as the reference builds them.
    """
    mats = []
    for theta in ROTATIONS:
        c, s = math.cos(theta), math.sin(theta)
        mats.append([[c, -s, 0.0], [s, c, 0.0]])
    for a, b in TRANSLATIONS:
        mats.append([[1.0, 0.0, a], [0.0, 1.0, b]])
    return torch.tensor(mats, dtype=torch.float64).float()


def view_grids(h: int, w: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[16, H, W, 2] sampling grids of the 16 affine views (:func:`view_affines`) at size (H, W):
    a function of the size only (an ONNX export takes it as a constant)."""
    mats = view_affines().to(device, dtype)
    return F.affine_grid(mats, [len(mats), 3, h, w], align_corners=True)


def rot90_views(x: torch.Tensor) -> list[torch.Tensor]:
    """[..., H, W] -> ``torch.rot90(x, k, dims=(-2, -1))`` for k = 1, 2, 3, as the flips and
    transposes rot90 itself is made of (bit-identical; ONNX has no rot90)."""
    return [x.flip(-1).transpose(-2, -1), x.flip((-2, -1)), x.flip(-2).transpose(-2, -1)]


def augmented_views(x: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, S, S] -> the 21 non-identity views [B, 21, 3, S, S].

    Order: 8 rotations, 8 translations (bilinear, reflection padding, align_corners=True),
    horizontal flip, greyscale of the normalised tensor (0.299 R + 0.587 G + 0.114 B, repeated),
    rot90 with k = 1, 2, 3.
    """
    b, c, h, w = x.shape
    grid = view_grids(h, w, x.device, x.dtype)  # [16, H, W, 2]
    n = grid.shape[0]
    rep = x.unsqueeze(1).expand(b, n, c, h, w).reshape(b * n, c, h, w)
    warped = F.grid_sample(rep, grid.repeat(b, 1, 1, 1), mode="bilinear", padding_mode="reflection", align_corners=True)
    wr, wg, wb = GREY_WEIGHTS
    grey = (x[:, 0] * wr + x[:, 1] * wg + x[:, 2] * wb).unsqueeze(1).expand(b, 3, h, w)
    rest = [x.flip(-1), grey] + rot90_views(x)
    return torch.cat([warped.reshape(b, n, c, h, w), torch.stack(rest, dim=1)], dim=1)


def smooth_and_upsample(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, gh, gw] patch probabilities -> [B, H, W]: 3x3 box filter (replicate padding), bilinear
    upsampling with align_corners=True."""
    m = F.pad(prob.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    m = F.avg_pool2d(m, 3, stride=1)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=True)[:, 0]


def tile_offsets(length: int, size: int) -> list[int]:
    """Start offsets of square tiles covering ``length`` with tiles of ``size``.

    Two tiles at 0 and length - size as the official VisA script; ceil(length / size) evenly
    spread tiles when one overlap cannot cover the middle (aspect ratio 2 or more).
    """
    if length <= size:
        return [0]
    n = max(2, math.ceil(length / size))
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def split_tiles(x: torch.Tensor, size: int) -> tuple[torch.Tensor, list[int], int]:
    """[B, C, H, W] with min(H, W) == size -> (tiles [B * T, C, size, size] image-major, offsets, axis)."""
    b, c, h, w = x.shape
    axis = -1 if w >= h else -2
    offsets = tile_offsets(x.shape[axis], size)
    tiles = torch.stack([x.narrow(axis, o, size) for o in offsets], dim=1)
    return tiles.reshape(b * len(offsets), c, size, size), offsets, axis


def stitch_tiles(tiles: torch.Tensor, offsets: Sequence[int], axis: int, out_size: tuple[int, int]) -> torch.Tensor:
    """[B, T, C, S, S] tile maps -> [B, C, H, W]; overlapping parts are averaged."""
    b, t, c, s, _ = tiles.shape
    if t == 1:
        return tiles[:, 0]
    total = tiles.new_zeros(b, c, *out_size)
    count = tiles.new_zeros(out_size[axis])
    for i, o in enumerate(offsets):
        total.narrow(axis, o, s).add_(tiles[:, i])
        count[o : o + s] += 1
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    return total / count.view(shape)


def residual_adapter(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, prompts: torch.Tensor | None
) -> torch.Tensor:
    """AnoCLIP's TTA adapter, one per image: ``0.5 z + 0.5 A(z / |z|)``.

    Args:
        z: [B, M, D] un-normalised projected tokens.
        weight: [B, O, D], bias: [B, O] each image's linear layer.
        prompts: [O, D] unit prompt embeddings (text adapter: A = tanh(linear) @ prompts), or None
            (linear adapter: A = linear, O = D).
    """
    a = torch.baddbmm(bias.unsqueeze(1), z / z.norm(dim=-1, keepdim=True), weight.transpose(1, 2))
    if prompts is not None:
        a = torch.tanh(a) @ prompts
    return 0.5 * z + 0.5 * a


def tta_objective(
    p_clean: torch.Tensor, p_noisy: torch.Tensor, entropy_weight: float = 1.0, label_weight: float = 0.5
) -> torch.Tensor:
    """Per-image TTA loss from (normal, abnormal) probabilities [B, P, 2] -> [B].

    entropy of the clean prediction + label_weight x (-log p_noisy[abnormal] - log p_clean[normal]),
    each averaged over the P positions; written as the reference (softmax, then log).
    """
    entropy = -(p_clean * p_clean.log()).sum(-1).mean(-1)
    hard = (-p_noisy[..., 1].log() - p_clean[..., 0].log()).mean(-1)
    return entropy_weight * entropy + label_weight * hard


def init_linear(out_features: int, in_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's default ``nn.Linear`` initialisation drawn from ``generator``: (weight [O, I], bias [O]).

    Same draws, in the same order, as ``nn.Linear.reset_parameters`` on the global RNG.
    """
    weight = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
    bias = torch.empty(out_features)
    nn.init.uniform_(bias, -bound, bound, generator=generator)
    return weight, bias


def consume_surgery_draws(generator: torch.Generator, width: int, blocks: int = 12) -> None:
    """Advance ``generator`` as the official code's lazy "architecture surgery" advances the global
    RNG: on the first image of a run (after its adapter init, before its noise) it builds, for each
    of 12 blocks, a Linear(W, 3W) and a Linear(W, W) with default random init."""
    for _ in range(blocks):
        init_linear(3 * width, width, generator)
        init_linear(width, width, generator)


# --------------------------------------------------------------------------- the method


@register_method("anoclip")
class AnoCLIP(Detector):
    """AnoCLIP zero-shot; AnoCLIP+ with ``tta=True``. Options: :class:`.AnoCLIPOptions`."""

    default_backbone = "ViT-B-16-plus-240"
    default_pretrained = "laion400m_e32"
    Options = AnoCLIPOptions
    opts: AnoCLIPOptions

    def __init__(self, backbone: Backbone, options: AnoCLIPOptions | None = None, **kwargs) -> None:
        super().__init__(backbone, options, **kwargs)
        o = self.opts
        self.dual_path_blocks = o.dual_path_blocks
        self.first_vv_block = first_block_of_last(backbone.depth, o.dual_path_blocks)
        self.domain = o.domain
        self.domain_phrases = o.domain_phrases
        self.class_name_spaces = o.class_name_spaces
        self.augment_views = o.augment_views
        self.tile_non_square = o.tile_non_square
        self.tta = o.tta
        self.adapter = o.adapter
        self.tta_steps = o.tta_steps
        self.tta_lr = o.tta_lr
        self.tta_weight_decay = o.tta_weight_decay
        self.noise_std = o.noise_std
        self.entropy_weight = o.entropy_weight
        self.label_weight = o.label_weight
        self.tta_seed = o.tta_seed
        self.official_compat = o.official_compat
        self.view_chunk = o.view_chunk
        self.reset_tta_state()

    # -- compat-mode state ---------------------------------------------------------------------
    def reset_tta_state(self) -> None:
        """Forget what ``official_compat`` carries across images: the per-class AdamW states and
        the position in the random stream (``tta_rng``, re-seeded with ``tta_seed``)."""
        self.tta_rng = torch.Generator().manual_seed(self.tta_seed)
        self._compat_adapters: dict[str, tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]] = {}
        self._compat_first_image = True

    # -- text ----------------------------------------------------------------------------------
    def export_refusal(self) -> str | None:
        if not self.tta:
            return None
        return ("anoclip with tta=True trains an adapter on every image (test-time adaptation); no fixed graph computes "
                "that: export it without test-time adaptation (leave out --tta, or --set tta=false)")

    def prompt_phrases(self, class_name: str) -> tuple[str, ...]:
        """The domain phrases used for ``class_name``."""
        if self.domain_phrases is not None:
            return self.domain_phrases
        return DOMAIN_PHRASES[resolve_domain(class_name, self.domain)]

    def text_features(self, class_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(means [2, D] unit (normal, abnormal), rows [2P, D] unit sentence embeddings), cached."""
        name = prompt_class_name(class_name, self.class_name_spaces)
        phrases = self.prompt_phrases(class_name)
        key = "anoclip|" + name + "|" + "|".join(phrases)
        both = self.cached_text(key, lambda: torch.cat(encode_prompt_set(self.backbone, name, phrases)))
        return both[:2], both[2:]

    # -- input sizes ---------------------------------------------------------------------------
    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Model input size (H, W) for an image of ``size``: square inputs (or with tiling off) at
        the model size; others with the shorter side at the model size, aspect kept (the long side
        truncated as torchvision's ``Resize(int)``)."""
        h, w = size
        s = self.image_size
        if not self.tile_non_square or h == w:
            return (s, s)
        return (s, int(s * w / h)) if w > h else (int(s * h / w), s)

    # -- scoring -------------------------------------------------------------------------------
    def _view_scores(self, tiles: torch.Tensor, cls_prob: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Mean abnormal probability over the 22 views of each tile [B*T] (identity from ``cls_prob``)."""
        total = cls_prob.clone()
        step = max(1, self.view_chunk // (N_VIEWS - 1))
        for i in range(0, tiles.shape[0], step):
            views = augmented_views(tiles[i : i + step]).flatten(0, 1)
            cls = self.backbone.encode_image(views).cls
            total[i : i + step] += state_probabilities(cls, text, normalize_text=False)[..., 1].view(-1, N_VIEWS - 1).sum(-1)
        return total / N_VIEWS

    def score_batch(self, x, class_name, reference):
        """Normalised images [B, 3, H, W] with min(H, W) = image_size -> (scores [B], maps [B, H, W])."""
        b, _, h, w = x.shape
        s = self.image_size
        if min(h, w) != s:
            raise ClipadError(f"anoclip scores inputs whose shorter side is image_size={s}; got {h}x{w}")
        means, rows = self.text_features(class_name)
        tiles, offsets, axis = split_tiles(x, s)
        t = len(offsets)
        feats = encode_image_dualpath(self.backbone, tiles, self.first_vv_block)
        gh, gw = feats.grid
        tile_scores = state_probabilities(feats.cls, means, normalize_text=False)[..., 1]
        if self.augment_views:
            tile_scores = self._view_scores(tiles, tile_scores, means)
        image_scores = tile_scores.view(b, t).mean(dim=1)

        z = self.backbone.project(feats.vv_tokens).float()  # [B*T, N, D], un-normalised
        if self.tta:
            z = self._adapt(z.view(b, t * gh * gw, -1), means, rows, (gh, gw), offsets, axis, (h, w), class_name)
            z = z.reshape(b * t, gh * gw, -1)
        prob = state_probabilities(z, means, normalize_text=False)[..., 1].view(b * t, gh, gw)
        maps = smooth_and_upsample(prob, (s, s)).view(b, t, 1, s, s)
        return image_scores, stitch_tiles(maps, offsets, axis, (h, w))[:, 0]

    # -- test-time adaptation ------------------------------------------------------------------
    def _adapt(self, z, means, rows, grid, offsets, axis, out_size, class_name) -> torch.Tensor:
        """[B, T*N, D] tokens -> adapted tokens, each image with its own freshly initialised adapter."""
        prompts = rows if self.adapter == "text" else None
        out_features = rows.shape[0] if prompts is not None else z.shape[-1]
        layout = (grid, offsets, axis, out_size)
        dev = z.device
        with torch.enable_grad(), torch.autocast(device_type=dev.type, enabled=False):
            if not self.official_compat:
                gen = torch.Generator().manual_seed(self.tta_seed)
                w0, b0 = self._draw_init(gen, len(offsets), out_features, z.shape[-1])
                weight = w0.to(dev).expand(z.shape[0], -1, -1).clone().requires_grad_(True)
                bias = b0.to(dev).expand(z.shape[0], -1).clone().requires_grad_(True)
                opt = torch.optim.AdamW([weight, bias], lr=self.tta_lr, weight_decay=self.tta_weight_decay)
                return self._train_adapter(z, means, prompts, weight, bias, opt, gen, layout)
            out = []
            for i in range(z.shape[0]):  # the official behaviour is sequential by definition
                weight, bias, opt = self._compat_adapter(class_name, out_features, z.shape[-1], dev)
                w0, b0 = self._draw_init(self.tta_rng, len(offsets), out_features, z.shape[-1])
                if self._compat_first_image:
                    consume_surgery_draws(self.tta_rng, self.backbone.width)
                    self._compat_first_image = False
                with torch.no_grad():
                    weight.copy_(w0.unsqueeze(0))
                    bias.copy_(b0.unsqueeze(0))
                out.append(self._train_adapter(z[i : i + 1], means, prompts, weight, bias, opt, self.tta_rng, layout))
            return torch.cat(out)

    def _draw_init(self, gen: torch.Generator, tiles: int, out_features: int, in_features: int):
        """The official per-image draws before training: the view permutation (square images with
        views on; consumed, its order only changes summation order), then the adapter init."""
        if self.augment_views:
            for _ in range(tiles):
                torch.randperm(N_VIEWS, generator=gen)
        return init_linear(out_features, in_features, gen)

    def _compat_adapter(self, class_name: str, out_features: int, in_features: int, device: torch.device):
        entry = self._compat_adapters.get(class_name)
        if entry is None or entry[0].shape[1:] != (out_features, in_features) or entry[0].device != device:
            weight = torch.zeros(1, out_features, in_features, device=device, requires_grad=True)
            bias = torch.zeros(1, out_features, device=device, requires_grad=True)
            opt = torch.optim.AdamW([weight, bias], lr=self.tta_lr, weight_decay=self.tta_weight_decay)
            entry = self._compat_adapters[class_name] = (weight, bias, opt)
        return entry

    def _train_adapter(self, z, means, prompts, weight, bias, opt, gen, layout) -> torch.Tensor:
        """``tta_steps`` AdamW steps on the summed per-image losses; -> adapted clean tokens [B, T*N, D]."""
        (gh, gw), offsets, axis, out_size = layout
        b, m, d = z.shape
        t = len(offsets)
        for _ in range(self.tta_steps):
            # one draw per step from the CPU stream, shared by the batch: each image sees the
            # stream it would see alone
            noise = torch.normal(0.0, self.noise_std, (t, gh, gw, d), generator=gen).to(z.device)
            both = residual_adapter(torch.cat([z, z + noise.view(1, m, d)], dim=1), weight, bias, prompts)
            logits = cosine_logits(both, means, normalize_text=False)  # [B, 2M, 2]
            p_clean, p_noisy = self._tta_probabilities(logits, (gh, gw), offsets, axis, out_size)
            loss = tta_objective(p_clean, p_noisy, self.entropy_weight, self.label_weight).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return residual_adapter(z, weight, bias, prompts)

    def _tta_probabilities(self, logits, grid, offsets, axis, out_size) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 2*T*N, 2] cosine logits (clean tiles, then noisy) -> (p_clean, p_noisy) [B, P, 2].

        Square images: per token. Tiled images: as the official VisA script, logits upsampled to
        the tile size, stitched, then the softmax per pixel of the whole image.
        """
        b = logits.shape[0]
        t = len(offsets)
        if t == 1:
            p = logits.softmax(dim=-1)
            half = p.shape[1] // 2
            return p[:, :half], p[:, half:]
        s = self.image_size
        gh, gw = grid
        up = logits.view(b * 2 * t, gh, gw, 2).permute(0, 3, 1, 2)
        up = F.interpolate(up, size=(s, s), mode="bilinear", align_corners=True)
        full = stitch_tiles(up.view(b * 2, t, 2, s, s), offsets, axis, out_size)  # [B*2, 2, H, W]
        p = full.softmax(dim=1).view(b, 2, 2, -1).permute(0, 1, 3, 2)  # [B, clean/noisy, P, 2]
        return p[:, 0], p[:, 1]
