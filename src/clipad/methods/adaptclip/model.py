"""AdaptCLIP (Gao et al., AAAI 2026): three light adapters on a frozen CLIP for zero- and
few-shot anomaly detection.

Behaviour follows the official code (gaobb/AdaptCLIP @ 354d9e3, ``test.py`` / ``train.py`` as
``scripts/test_adaptclip.sh`` / ``train_adaptclip.sh`` run them: all three adapters, context
features, taps 6/12/18/24, 518 px):

- image tower: the DPAM dual path (:mod:`clipad.dualpath`) on the last ``DPAM_layer - 1`` blocks,
  ``DPAM_layer = round(dpam_layer x depth)`` (20 of 24 blocks for ViT-L/14, 10 of 12 for
  ViT-B-16+: both official settings are the fraction 5/6); positional embedding interpolated
  bilinearly (no antialiasing) to the input grid;
- local tokens: the V-V state after each tap block, ``ln_post`` then ``proj`` (CLS row kept);
- global feature: the *original* path's final CLS token ``@ proj`` **without** ``ln_post``
  (official; ``global_ln_post=True`` uses the vanilla CLIP embedding instead);
- textual adapter: learned prompts "[12 context vectors]." for normal and abnormal
  (:class:`~clipad.prompt_learning.LearnablePrompts`, no template, no class word), scored against
  the un-adapted global feature (image logits) and the last tap (map);
- visual adapter: residual MLPs (d -> d/4 -> d, BatchNorm, ReLU, no biases) on the global feature
  and on the last tap's tokens, scored against the *static* prompt ensemble of "object"
  (WinCLIP's 7 normal / 4 abnormal states x 21 templates, mean raw embedding per state);
- scores of both: ``cos / 0.07``; maps ``softmax`` over (normal, abnormal) on the patch grid,
  bilinear to the input size, abnormal channel;
- prompt-query adapter, per tap: unit query and reference tokens, the nearest reference token
  over all k shots (max cosine) -> alignment score ``1 - cos`` (bilinear to the input size) and
  the aligned token; joint feature ``q + |q - aligned|`` (``pq_context=False``: ``|q - aligned|``)
  -> BatchNorm2d of that tap -> segmentation head (softmax, bilinear) and image head on
  ``(mean + top-10 mean) / 2`` over positions. **One** segmentation head and **one** image head
  serve all taps (the official ModuleList repeats a single instance); the BatchNorm2d is per tap;
- fusion (``test.py``): zero-shot map = mean(visual, textual); k-shot map =
  harmonic_mean(mean(visual, textual, PQ map averaged over taps), harmonic mean over taps of the
  alignment maps); Gaussian sigma 4 (:mod:`clipad.smoothing`, on the device); image score
  zero-shot = mean(visual prob, textual prob, max of map), k-shot = harmonic_mean(mean(visual,
  textual, PQ prob averaged over taps), max of map); NaN / inf -> 0;
- training (``train.py``): per branch cross-entropy on the image logits + focal + dice(abnormal,
  mask) + dice(normal, 1 - mask) (:mod:`clipad.losses`), the PQ branch summed over its taps, all
  summed unweighted, one Adam over all adapters. The released "alternating" learning is this
  joint step with each modality adapted against the other held fixed (visual adapter vs static
  text, learned text vs un-adapted image features). ``schedule="alternate"`` (clipad's extension)
  instead updates the visual and the textual adapter on alternate steps (PQ every step).

Quirk kept by default: the official tower stores a tap *before* the first dual-path block without
copying it, and that tensor becomes the V-V path's state, to which every dual-path block adds its
attention output in place; such a tap therefore holds the *final* V-V state. No default ViT-L tap
is affected (the first dual block is 6, the first tap 6); on ViT-B-16+ (dual from block 4) tap 3
is, and on ``tiny`` (dual from block 3) tap 2. ``exact_taps=True`` reads the state after the tap
block itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.clip import Backbone
from ...backbones.dualpath import encode_image_dualpath, first_block_of_dpam_layer
from ...errors import ClipadError
from ...components.losses import image_cross_entropy, segmentation_loss
from ...components.prompt_learning import LearnablePrompts
from ...components.smoothing import gaussian_blur
from ...components.prompts import WINCLIP_ANOMALOUS_STATES, WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES, state_embeddings
from ..base import LearnedDetector
from ..registry import register_method
from .convert import convert_official
from .options import AdaptCLIPOptions
from ...components.scoring import cosine_logits, default_image_size, harmonic_mean, patch_probability_maps, token_maps

PROMPT_TEXTS = ("{}.", "{}.")  # normal, abnormal: context vectors only, no template
STATIC_CLASS = "object"  # the official static text never names the class
SCHEDULES = ("released", "alternate")


# --------------------------------------------------------------------------- pure functions


def nearest_reference(query: torch.Tensor, memory: torch.Tensor, chunk: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest reference token by cosine, one matrix product per chunk of queries.

    Args:
        query: [B, N, D] unit query tokens.
        memory: [M, D] unit reference tokens shared by the batch (k shots x N patches), or
            [B, M, D] one memory per query (training: each query has its own reference).
        chunk: bound on the B x N x M similarity entries computed at once (memory, not results).
    Returns:
        (distance [B, N] = ``1 - max cos``, aligned [B, N, D] the nearest reference tokens).
    """
    b, n, d = query.shape
    per_query = memory.ndim == 3
    m = memory.shape[-2]
    step = max(1, chunk // max(1, n * m))
    dists, aligned = [], []
    for s in range(0, b, step):
        q = query[s : s + step]
        mem = memory[s : s + step] if per_query else memory
        dist, idx = (1.0 - q @ mem.transpose(-1, -2)).min(dim=-1)  # [b', N]
        if per_query:
            near = torch.gather(mem, 1, idx.reshape(q.shape[0], -1, 1).expand(-1, -1, d))
        else:
            near = mem[idx]
        dists.append(dist)
        aligned.append(near)
    return torch.cat(dists), torch.cat(aligned)


# --------------------------------------------------------------------------- adapter modules


class ResidualMLP(nn.Module):
    """``x + fc2(relu(norm(fc1(x))))`` on [..., D], hidden width D // reduction, no biases.

    The BatchNorm1d sees all leading positions as one batch (for tokens: every token of every
    image, CLS included, as the official code flattens them)."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ClipadError(f"adapter reduction {reduction} leaves no hidden units for width {dim}")
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.norm = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.fc2(F.relu(self.norm(self.fc1(flat))))
        return x + out.reshape(x.shape)


class TokenAdapter(nn.Module):
    """The visual adapter: one residual MLP for the global feature, one for the local tokens."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        self.global_mlp = ResidualMLP(dim, reduction)
        self.local_mlp = ResidualMLP(dim, reduction)


def segmentation_head(dim: int, mid: int) -> nn.Sequential:
    """[B, dim, g, g] -> [B, 2, 4g, 4g] logits: conv3x3 (no bias), BN, ReLU, deconv x2,
    conv3x3 to mid/2 (no bias), BN, ReLU, deconv x2, conv1x1 to 2."""
    half = mid // 2
    return nn.Sequential(
        nn.Conv2d(dim, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.ConvTranspose2d(mid, mid, 2, stride=2),
        nn.Conv2d(mid, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        nn.ConvTranspose2d(half, half, 2, stride=2),
        nn.Conv2d(half, 2, 1),
    )


def image_head(dim: int, mid: int) -> nn.Sequential:
    """[B, dim] -> [B, 2] logits: Linear, BN, ReLU, Linear, BN, ReLU, Linear (no biases)."""
    half = mid // 2
    return nn.Sequential(
        nn.Linear(dim, mid, bias=False), nn.BatchNorm1d(mid), nn.ReLU(),
        nn.Linear(mid, half, bias=False), nn.BatchNorm1d(half), nn.ReLU(),
        nn.Linear(half, 2, bias=False),
    )


class PromptQueryAdapter(nn.Module):
    """Compares query tokens with their nearest reference tokens, per tap.

    One BatchNorm2d per tap; a single segmentation head and a single image head shared by all
    taps (as the official module, whose per-layer list holds one instance).
    """

    def __init__(self, dim: int, mid: int, taps: int, context: bool = True, topk: int = 10) -> None:
        super().__init__()
        if mid < 2:
            raise ClipadError(f"pq_mid_dim must be >= 2; got {mid}")
        self.context = bool(context)
        self.topk = int(topk)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(taps))
        self.seg_head = segmentation_head(dim, mid)
        self.image_head = image_head(dim, mid)

    def forward(
        self, query: list[torch.Tensor], memory: list[torch.Tensor], grid: tuple[int, int], size: tuple[int, int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per tap: unit query tokens [B, N, D] and unit memory [M, D] or [B, M, D] ->
        (image logits [B, 2], segmentation probabilities [B, 2, H, W], alignment maps [B, H, W])."""
        logits, probs, align = [], [], []
        for i, (q, mem) in enumerate(zip(query, memory)):
            b, n, d = q.shape
            dist, near = nearest_reference(q, mem)
            align.append(token_maps(dist[..., None], grid, size)[:, 0])
            joint = (q + (q - near).abs()) if self.context else (q - near).abs()
            joint = self.norms[i](joint.transpose(1, 2).reshape(b, d, *grid))
            seg = self.seg_head(joint).softmax(dim=1)
            probs.append(F.interpolate(seg, size=size, mode="bilinear", align_corners=False))
            flat = joint.reshape(b, d, n)
            pooled = (flat.mean(dim=-1) + flat.topk(min(self.topk, n), dim=-1).values.mean(dim=-1)) / 2.0
            logits.append(self.image_head(pooled))
        return logits, probs, align


# --------------------------------------------------------------------------- the method


@register_method("adaptclip", converter=convert_official)
class AdaptCLIP(LearnedDetector):
    """AdaptCLIP: zero-shot with the visual and textual adapters, k-shot with ``set_reference``.
    Options: :class:`.AdaptCLIPOptions`."""

    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    few_shot = True
    Options = AdaptCLIPOptions
    opts: AdaptCLIPOptions
    # the official train.py: Adam(lr 1e-3, betas (0.5, 0.999)), 15 epochs, batch 8, seed 10
    training_defaults: ClassVar[dict[str, Any]] = {"epochs": 15, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999), "seed": 10}
    # normal reference images per training query (the official train.py draws one)
    training_references: ClassVar[int] = 1
    min_train_batch: ClassVar[int] = 2  # BatchNorm1d of the image head needs two samples when training

    def __init__(self, backbone: Backbone, options: AdaptCLIPOptions | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, options, **kwargs)
        o = self.opts
        self.tap_layers = backbone.tap_layers(o.taps)
        self.first_vv_block = first_block_of_dpam_layer(backbone.depth, o.dpam_layer)
        self.temperature = o.temperature
        self.sigma = o.sigma
        self.global_ln_post = o.global_ln_post
        self.exact_taps = o.exact_taps
        self.schedule = o.schedule
        self._steps = 0  # training steps taken, for schedule="alternate"
        dim = backbone.embed_dim
        self.prompts = LearnablePrompts(backbone, PROMPT_TEXTS, o.n_ctx)
        self.visual_adapter = TokenAdapter(dim, o.va_reduction)
        self.pq_adapter = PromptQueryAdapter(dim, o.pq_mid_dim, len(self.tap_layers), context=o.pq_context)
        self.reset_parameters(0)

    @classmethod
    def default_input_size(cls, backbone: Backbone) -> int:
        return default_image_size(backbone.patch_size[0])

    # -- learned state -------------------------------------------------------------------------
    def _learned_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and BatchNorm running statistics (``num_batches_tracked`` is not used by
        BatchNorm with a fixed momentum, so it is not part of the state)."""
        state = {"prompts.ctx": self.prompts.ctx}
        for prefix, module in (("visual_adapter", self.visual_adapter), ("pq_adapter", self.pq_adapter)):
            for k, v in module.state_dict(keep_vars=True).items():
                if not k.endswith("num_batches_tracked"):
                    state[f"{prefix}.{k}"] = v
        return state

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._learned_tensors().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        self.copy_learned(
            self._learned_tensors(), state,
            f"{len(self.tap_layers)} taps, n_ctx / va_reduction / pq_mid_dim, the backbone's width and the checkpoint's method",
        )

    def reset_parameters(self, seed: int) -> None:
        """Fresh adapters: prompts from N(0, 0.02), layers with PyTorch's default initialisation
        (as the official modules), BatchNorm statistics reset; all drawn from ``seed``."""
        self.prompts.reset_parameters(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for module in (*self.visual_adapter.modules(), *self.pq_adapter.modules()):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self._steps = 0
        self._text_cache.clear()

    # -- features ------------------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """Normalised [B, 3, S, S] -> (global [B, D], projected taps [B, 1 + N, D] each, grid)."""
        bb = self.backbone
        first = self.first_vv_block
        alias = not self.exact_taps and 2 <= first <= bb.depth and (first - 1) in self.tap_layers
        vv = set(self.tap_layers) | ({bb.depth} if alias else set())
        feats = encode_image_dualpath(bb, x, first, vv_taps=sorted(vv), orig_taps=(bb.depth,), pos_interp="bilinear")
        if self.global_ln_post:
            glob = feats.cls
        else:
            cls = feats.orig_taps[bb.depth][:, 0]
            glob = cls @ bb.visual.proj if bb.visual.proj is not None else cls
        taps = []
        for layer in self.tap_layers:
            state = feats.vv_taps[bb.depth] if alias and layer == first - 1 else feats.vv_taps[layer]
            taps.append(bb.project(state))
        return glob, taps, feats.grid

    def static_text(self) -> torch.Tensor:
        """[2, D] (normal, abnormal) mean raw embeddings of the static prompt ensemble (cached)."""

        def compute() -> torch.Tensor:
            with torch.autocast(self.device.type, enabled=False):
                return state_embeddings(
                    self.backbone, STATIC_CLASS, (WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES), WINCLIP_TEMPLATES
                )

        return self.cached_text("adaptclip-static", compute)

    def learned_text(self) -> torch.Tensor:
        """[2, D] (normal, abnormal) embeddings of the learned prompts (cached at inference)."""

        def compute() -> torch.Tensor:
            with torch.autocast(self.device.type, enabled=False):
                return self.prompts(self.backbone).float()

        return self.cached_text("adaptclip-learned", compute)

    @staticmethod
    def _unit_patches(tokens: torch.Tensor) -> torch.Tensor:
        """Projected tap [B, 1 + N, D] -> unit patch tokens [B, N, D] (normalised, then CLS dropped)."""
        return F.normalize(tokens.float(), dim=-1)[:, 1:]

    def encode_reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normal images [K, 3, S, S] -> per tap the unit patch tokens of all K shots [K * N, D]."""
        _, taps, _ = self.encode_image(x)
        memory = {f"tap_{i}": self._unit_patches(t).reshape(-1, t.shape[-1]) for i, t in enumerate(taps)}
        memory["shots"] = torch.tensor(x.shape[0])
        return memory

    # -- the three branches --------------------------------------------------------------------
    def _branches(
        self, glob: torch.Tensor, taps: list[torch.Tensor], grid: tuple[int, int], text: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """-> {"visual": (logits [B, 2], probs [B, 2, S, S]), "textual": (...)}."""
        size, t = self.model_size, self.temperature
        static = self.static_text()
        va = self.visual_adapter
        g = va.global_mlp(glob.float())
        local = va.local_mlp(taps[-1].float())  # CLS row included, as the official BatchNorm batch
        visual = (cosine_logits(g, static, t), patch_probability_maps(local[:, 1:], static, grid, size, t))
        textual = (cosine_logits(glob, text, t), patch_probability_maps(taps[-1][:, 1:], text, grid, size, t))
        return {"visual": visual, "textual": textual}

    def score_batch(self, x, class_name, reference):
        text = self.learned_text()
        glob, taps, grid = self.encode_image(x)
        with torch.autocast(self.device.type, enabled=False):
            out = self._branches(glob, taps, grid, text)
            (gv, mv), (gt, mt) = out["visual"], out["textual"]
            p_v, p_t = gv.softmax(-1)[:, 1], gt.softmax(-1)[:, 1]
            if reference is None:
                maps = gaussian_blur(torch.stack([mv[:, 1], mt[:, 1]]).mean(dim=0), self.sigma)
                scores = torch.stack([p_v, p_t, maps.flatten(1).amax(dim=1)]).mean(dim=0)
            else:
                memory = [reference[f"tap_{i}"].float() for i in range(len(taps))]
                logits, probs, align = self.pq_adapter([self._unit_patches(t) for t in taps], memory, grid, self.model_size)
                m_pq = torch.stack([p[:, 1] for p in probs]).mean(dim=0)
                p_pq = torch.stack([lg.softmax(-1) for lg in logits]).mean(dim=0)[:, 1]
                maps = harmonic_mean([torch.stack([mv[:, 1], mt[:, 1], m_pq]).mean(dim=0), harmonic_mean(align)])
                maps = gaussian_blur(maps, self.sigma)
                scores = harmonic_mean([torch.stack([p_v, p_t, p_pq]).mean(dim=0), maps.flatten(1).amax(dim=1)])
        return scores.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0), maps.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    # -- training interface (clipad.train) -----------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.prompts.parameters(), *self.visual_adapter.parameters(), *self.pq_adapter.parameters()]

    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        *,
        class_names: Sequence[str] | None = None,
        references: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch's loss, as the official ``train.py`` with all three adapters.

        Args:
            images: [B, 3, S, S] CLIP-normalised images at ``image_size``.
            masks: [B, S, S] {0, 1} anomaly masks (float).
            labels: [B] 0 normal / 1 anomalous.
            references: [B, R, 3, S, S] CLIP-normalised normal images of each query's class
                (R = ``training_references`` = 1 officially); None trains without the PQ branch.
        Returns:
            (loss, parts): the scalar to minimise and detached per-branch terms
            ``<branch>_ce`` and ``<branch>_local`` (focal + both Dice; PQ summed over taps).
        """
        self._text_cache.clear()
        labels = labels.to(images.device)
        masks = masks.to(images.device, torch.float32)
        with torch.no_grad():
            glob, taps, grid = self.encode_image(images)
            if references is not None:
                b, r = references.shape[:2]
                _, ref_taps, _ = self.encode_image(references.reshape(b * r, *references.shape[2:]))
        branches = ["visual", "textual"]
        if self.schedule == "alternate":
            branches = [branches[self._steps % 2]]
        self._steps += 1
        static_only = "textual" not in branches
        text = None if static_only else self.prompts(self.backbone).float()
        size, t = self.model_size, self.temperature
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=images.device)

        def add(name: str, ce: torch.Tensor, probs: list[torch.Tensor]) -> None:
            nonlocal total
            local = torch.zeros((), device=images.device)
            for p in probs:
                focal, dice_a, dice_n = segmentation_loss(p, masks)
                local = local + focal + dice_a + dice_n
            total = total + local + ce
            parts[f"{name}_ce"], parts[f"{name}_local"] = ce.detach(), local.detach()

        if "visual" in branches:
            static = self.static_text()
            va = self.visual_adapter
            local = va.local_mlp(taps[-1].float())
            logits = cosine_logits(va.global_mlp(glob.float()), static, t)
            add("visual", image_cross_entropy(logits, labels), [patch_probability_maps(local[:, 1:], static, grid, size, t)])
        if "textual" in branches:
            logits = cosine_logits(glob, text, t)
            add("textual", image_cross_entropy(logits, labels), [patch_probability_maps(taps[-1][:, 1:], text, grid, size, t)])
        if references is not None:
            query = [self._unit_patches(q) for q in taps]
            memory = [self._unit_patches(m).reshape(b, -1, m.shape[-1]) for m in ref_taps]
            logits, probs, _ = self.pq_adapter(query, memory, grid, size)
            add("pq", torch.stack([image_cross_entropy(lg, labels) for lg in logits]).sum(), probs)
        return total, parts
