"""MuSc (Li et al., ICLR 2024, "MuSc: Zero-Shot Industrial Anomaly Classification and
Segmentation with Mutual Scoring of the Unlabeled Images"): zero-shot, training-free and
**transductive**: the unlabeled test images of one class are scored against each other.

Official code: github.com/xrli-U/MuSc, commit b76b93d (``models/musc.py``,
``models/modules/_LNAMD.py``, ``_MSM.py``, ``_RsCIN.py``). Paper / README numbers (zero-shot,
ViT-L-14-336 @ 518, image / pixel AUROC): MVTec AD 97.8 / 97.3, VisA 92.8 / 98.8.

Pipeline for a set of N images (all at once: :attr:`Detector.transductive`):

1. the residual stream after blocks 6/12/18/24 of 24 (``layers``), CLS dropped;
2. **LNAMD**, per degree r in ``r_list`` and per tap: LayerNorm over (C, H, W) of each image
   (no affine), the mean over each r x r neighbourhood (zero padding counted), L2 over C;
3. **MSM**, per degree and tap: for each patch of image i, its minimum distance to the patches
   of every other image j (N - 1 values), then the mean of the k = int(0.3 (N - 1)) smallest
   (``interval``); cost O(N^2 L^2 C) for L patches of width C, computed in blocks of at most
   ``chunk_mb`` MiB;
4. the mean over taps then over degrees (float64) -> patch map; bilinear ``align_corners=True``
   upsampling to the input size; image score = max of the upsampled map;
5. **RsCIN**: scores min-max normalised over the set, then averaged over each image's k most
   similar images by class token (cosine), averaged over k in ``k_list``.

Quirks of the official code, all reproduced (default = faithful):

1. At an image size other than the checkpoint's (518 for ViT-L-14-336 @ 336), the official
   loader rebuilds CLIP from the JSON config, so OpenAI's QuickGELU weights run with **GELU**
   MLPs (:meth:`MuSc.backbone_options` asks for ``config_activation``); at the native size it
   keeps QuickGELU.
2. Its positional embedding is resized by **plain bicubic** (no antialias), ``pos_interp=
   "bicubic-plain"``.
3. OpenAI weights are rounded to fp16 on load by the official loader; OpenAI's files already
   hold fp16-exact values, so loading them unchanged gives the same weights.
4. LayerNorm over (C, H, W) jointly per image and tap (not per token).
5. Zero padding in the r x r windows (the padding divisor cancels in the L2 normalisation).
6. Every image's map depends on every other image in the set: ``predict`` and ``clipad eval``
   give the whole set (one class) at once; fewer images than :attr:`MuSc.min_set_size` (5 at
   the default interval: k = int(0.3 (N - 1)) must be >= 1; the official code returns NaN) is an
   error.
7. ``align_corners=True`` in the final upsampling (no Gaussian smoothing).
8. The image score is the max of the **upsampled** map, not of the patch grid.
9. RsCIN makes the final scores relative to the set (in [0, 1]); its k_list depends on the
   dataset (``k_list``: (1, 2, 3) MVTec AD and others, (1, 8, 9) VisA).
10. On a GPU the official code runs the backbone and LNAMD under fp16 autocast; clipad runs
    LNAMD, MSM and RsCIN in float32 (float64 means) under any precision.
11. Non-square inputs are squashed to S x S (as every clipad method; ``clipad eval --resize pil``
    is the official PIL bicubic resize of uint8 images, the default torch resize differs from it
    by interpolation rounding; the official DINO branch resizes bilinearly).
12. DINOv2 backbones: every tap goes through the model's final LayerNorm (the official
    ``get_intermediate_layers(norm=True)``).
13. DINOv2 backbones: RsCIN's class tokens are the normed CLS token **without** L2 normalisation,
    so its similarities weigh images by token norm (k = 1 need not pick the image itself).
14. The vendored ViT collects block 12's attention and fails below 12 blocks (test models only).

Where the official code is undefined clipad chooses: a set whose raw scores are all equal gets
normalised scores 0 (official: NaN); k > N in ``k_list`` keeps all N neighbours (official: a
topk error, e.g. VisA's k = 9 with fewer than 9 images); ``divide_num`` splits by position (i mod
divide_num) where the official splits each anomaly type's shuffled list, using the labels.

Backbones: CLIP (default) and DINOv2 (``dinov2_vitb14``, ``dinov2_vitl14``..., the official
alternatives, quirks 12-13; DINO v1 is not available in clipad). For CLIP, RsCIN's class tokens
are the L2-normalised ``ln_post(cls) @ proj``. Fidelity to the official code (both families):
tests/unit/methods/musc, fixtures by tools/musc_fixtures.py; docs/musc.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...backbones.clip import Backbone
from ...backbones.precision import float32_head
from ...components.scoring import default_image_size
from ...errors import InvalidValueError
from ..base import Detector
from ..registry import register_method
from .options import MuScOptions

OFFICIAL_COMMIT = "b76b93da8bd3096a99964a96ae29d46f197a0651"


@float32_head
def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Local neighbourhood aggregation of one tap.

    tokens: [B, L, C] patch tokens (row-major grid ``grid`` = (gh, gw), L = gh gw) ->
    [B, L, C]: LayerNorm over (C, H, W) of each image (no affine, eps 1e-5), the mean over each
    r x r window (odd r; zero padding, counted in the divisor), L2-normalised over C.
    """
    b, n, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *grid)
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    x = x.flatten(2).transpose(1, 2)
    return x / x.norm(dim=-1, keepdim=True)


def interval_bounds(n_others: int, interval: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max): MSM averages the k_min-th .. (k_max - 1)-th smallest of ``n_others``
    per-image distances (0-based ranks), as the official ``int(n * fraction)``."""
    k_min, k_max = int(n_others * interval[0]), int(n_others * interval[1])
    return min(k_min, k_max), max(k_min, k_max)


def min_images(interval: Sequence[float]) -> int:
    """Smallest set size whose interval holds at least one image (5 for (0, 0.3))."""
    n = 2
    while True:
        k_min, k_max = interval_bounds(n - 1, interval)
        if k_max > k_min:
            return n
        n += 1


@float32_head
def mutual_scores(z: torch.Tensor, interval: Sequence[float] = (0.0, 0.3), max_bytes: int = 256 << 20) -> torch.Tensor:
    """Mutual scoring of a set.

    z: [N, L, C] aggregated patch features of N images -> [N, L] float64: for each patch of
    image i, the minimum Euclidean distance to the patches of each other image j != i, then
    the mean of the ranks ``interval_bounds(N - 1, interval)`` of these N - 1 values sorted
    ascending (default: the int(0.3 (N - 1)) smallest).

    Cost: N^2 L^2 C multiply-adds (quadratic in the set size). Distances are computed ``q``
    query images against ``q`` reference images at a time, q = floor(sqrt(max_bytes / (4 L^2)))
    (at least 1), so one block holds at most ``max_bytes`` (or one image pair); memory besides
    that: two augmented copies of z (N L (C + 2) floats each) and q L N floats of minima.
    """
    n, length, c = z.shape
    k_min, k_max = interval_bounds(n - 1, interval)
    if k_max <= k_min:
        raise InvalidValueError(f"mutual scoring of {n} images averages no image at interval {list(interval)}; "
                                f"it needs at least {min_images(interval)}")
    q = max(1, min(n, math.isqrt(max(1, max_bytes // (4 * length * length)))))
    out = torch.empty(n, length, dtype=torch.float64, device=z.device)
    # torch.cdist's matrix-product form (|x|^2 + |y|^2 - 2 x.y as one product of augmented rows),
    # built once; the minimum is taken before the square root, which is monotone: the same minima
    # as cdist's, with L square roots per image pair instead of L^2
    flat = z.reshape(n * length, c)
    sq = flat.pow(2).sum(-1, keepdim=True)
    ones = torch.ones_like(sq)
    left, right = torch.cat([flat.mul(-2), sq, ones], -1), torch.cat([flat, ones, sq], -1)
    for i0 in range(0, n, q):
        i1 = min(n, i0 + q)
        mins = torch.empty(i1 - i0, length, n, dtype=z.dtype, device=z.device)  # [q, L, N]
        for j0 in range(0, n, q):
            j1 = min(n, j0 + q)
            d2 = left[i0 * length : i1 * length] @ right[j0 * length : j1 * length].T
            mins[:, :, j0:j1] = d2.view(i1 - i0, length, j1 - j0, length).amin(-1)
        mins = mins.clamp_min_(0).sqrt_()
        own = torch.arange(i0, i1, device=z.device)
        mins[own - i0, :, own] = float("inf")  # an image is not compared with itself
        vals = mins.topk(k_max, dim=-1, largest=False, sorted=True).values[..., k_min:]
        out[i0:i1] = vals.mean(-1).double()
    return out


@float32_head
def rscin(scores: torch.Tensor, class_tokens: torch.Tensor, k_list: Sequence[int]) -> torch.Tensor:
    """Re-scoring with constrained image-level neighbourhood.

    scores: [N] raw image scores; class_tokens: [N, D] (L2-normalised for CLIP) -> [N] float32:
    scores min-max normalised over the set (all 0 when they are all equal), then for each k in
    ``k_list`` the mean over the k images most similar by ``class_tokens @ class_tokens.T``
    (itself included), weighted by that similarity; the mean over k. Empty ``k_list``: ``scores``.
    """
    if not k_list:
        return scores.float()
    s64 = scores.double()
    span = s64.max() - s64.min()
    s = ((s64 - s64.min()) / span if span > 0 else torch.zeros_like(s64)).float()
    w = class_tokens @ class_tokens.T
    n = w.shape[0]
    out = []
    for k in k_list:
        kept = w.clone()
        drop = w.topk(max(0, n - k), dim=1, largest=False, sorted=True).indices
        kept.scatter_(1, drop, 0.0)  # keep each row's k largest similarities
        p = kept * (1.0 / kept.sum(1, keepdim=True))
        out.append(p @ s)
    return torch.stack(out, -1).mean(-1)


@register_method("musc")
class MuSc(Detector):
    """MuSc, zero-shot and transductive: ``predict`` scores a set of images of one class
    against each other. Options: :class:`.MuScOptions`."""

    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    backbone_families = ("clip", "dinov2")
    transductive = True
    Options = MuScOptions
    opts: MuScOptions

    def __init__(self, backbone: Backbone, options: MuScOptions | None = None, **kwargs) -> None:
        super().__init__(backbone, options, **kwargs)
        self.layers = backbone.tap_layers(self.opts.layers)
        ph, pw = backbone.patch_size
        self.grid = (self.image_size // ph, self.image_size // pw)

    def export_refusal(self) -> str | None:
        return ("musc scores a whole set of images against each other (transductive), not one image at a time; no "
                "per-image graph computes that: run it with clipad predict / clipad eval on the set")

    @classmethod
    def default_input_size(cls, backbone: Backbone) -> int:
        return default_image_size(backbone.patch_size[0])

    @classmethod
    def backbone_options(cls, options: MuScOptions, backbone: str | None = None) -> dict[str, Any]:
        """GELU MLPs (the architecture config's activation) unless the image size is the
        checkpoint's own (quirk 1). ``backbone``: the architecture name (default: MuSc's)."""
        native, patch = _native_size(backbone or cls.default_backbone)
        size = options.image_size if options.image_size is not None else default_image_size(patch or 14)
        return {} if native is None or size == native else {"config_activation": True}

    @property
    def min_set_size(self) -> int:
        """Fewest images a set needs: every subset of ``divide_num`` needs ``min_images(interval)``."""
        return min_images(self.opts.interval) * self.opts.divide_num

    def _features(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Normalised [B, 3, S, S] -> (taps {layer: [B, L, C] patch tokens}, class tokens [B, D]).

        CLIP: the raw residual stream and the L2-normalised ``ln_post(cls) @ proj``. DINOv2 (the
        official ``get_intermediate_layers(norm=True)`` and ``model(x)``): every tap through the
        model's final LayerNorm, and the normed CLS token, not L2-normalised."""
        dinov2 = getattr(self.backbone, "family", "clip") == "dinov2"
        feats = self.backbone.encode_image(x, self.layers, pos_interp="bicubic-plain")
        n = self.grid[0] * self.grid[1]
        taps = {l: feats.taps[l][:, -n:] for l in self.layers}  # patch rows come last
        if dinov2:
            taps = {l: self.backbone.model.norm(t) for l, t in taps.items()}
        cls = feats.cls.float()
        if not dinov2:
            cls = cls / cls.norm(dim=-1, keepdim=True)
        return {l: t.float() for l, t in taps.items()}, cls

    def patch_scores(self, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """{layer: [N, L, C]} of one set -> [N, L] float64: MSM of LNAMD features, averaged over
        taps then over degrees."""
        max_bytes = self.opts.chunk_mb << 20
        per_degree = []
        for r in self.opts.r_list:
            per_layer = [mutual_scores(lnamd(taps[l], self.grid, r), self.opts.interval, max_bytes) for l in self.layers]
            per_degree.append(torch.stack(per_layer).mean(0))
        return torch.stack(per_degree).mean(0)

    def score_set(self, batches, class_name, reference):
        n = sum(int(x.shape[0]) for x in batches)
        taps: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        cls = []
        for x in batches:  # the backbone sees one batch at a time: memory bounded by the batch size
            t, c = self._features(x)
            for l in self.layers:
                taps[l].append(t[l])
            cls.append(c)
        all_taps = {l: torch.cat(v) for l, v in taps.items()}
        patch = torch.empty(n, self.grid[0] * self.grid[1], dtype=torch.float64, device=self.device)
        d = self.opts.divide_num
        for s in range(d):
            idx = torch.arange(s, n, d, device=self.device)
            patch[idx] = self.patch_scores({l: v[idx] for l, v in all_taps.items()})
        maps = F.interpolate(patch.view(n, 1, *self.grid), size=self.model_size, mode="bilinear", align_corners=True)[:, 0]
        raw = maps.flatten(1).amax(1)
        return rscin(raw, torch.cat(cls), self.opts.k_list), maps

    def score_batch(self, x, class_name, reference):
        return self.score_set([x], class_name, reference)


def _native_size(name: str) -> tuple[int | None, int | None]:
    """(image size, patch size) an open_clip architecture's weights were made for (tiny: its
    config); (None, None) for other names (backbone families without this quirk)."""
    import open_clip

    from ...backbones.clip import _tiny_config

    cfg = _tiny_config() if name == "tiny" else open_clip.get_model_config(name)
    vision = (cfg or {}).get("vision_cfg", {})
    size, patch = vision.get("image_size"), vision.get("patch_size")
    return (size, patch) if isinstance(size, int) and isinstance(patch, int) else (None, None)
