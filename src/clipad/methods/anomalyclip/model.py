"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompt learning for zero-shot anomaly
detection.

Behaviour follows the official code (zqhang/AnomalyCLIP @ 45ed4dd, ``test.py`` / ``train.py``
as its ``test.sh`` / ``train.sh`` run them):

- image tower: the DPAM dual path (:mod:`clipad.dualpath`) from block ``dpam_start`` x depth on
  (block 6 of 24 = the official ``DPAM_layer=20``), positional embedding interpolated bilinearly
  (no antialiasing) to the 518 px grid;
- local tokens: the V-V state after each tap block, ``ln_post`` then ``proj``;
- global feature: the *original* path's final CLS token ``@ proj`` **without** ``ln_post``
  (official; ``global_ln_post=True`` uses the vanilla CLIP embedding instead);
- text: two learned prompts, "[12 context vectors] object." and "[12] damaged object."
  (:class:`~clipad.prompt_learning.LearnablePrompts`), with 8 sets of 4 deep prompts in text
  layers 2..9; normalised; the class name is never used (object-agnostic);
- image score: ``softmax(cos(global, [w_n, w_a]) / 0.07)[abnormal]``; it never uses the map;
- map, per tap: ``softmax(cos(token, [w_n, w_a]) / 0.07)`` on the patch grid, bilinear to the
  input size, ``(p_a + 1 - p_n) / 2``; summed over taps; Gaussian sigma 4 (:mod:`clipad.smoothing`);
- training loss: ``local_loss_weight x sum over taps (focal + dice(p_a, mask) + dice(p_n, 1 -
  mask)) + cross-entropy(image logits)`` (:mod:`clipad.losses`).

Which layers: the paper and the scripts' argparse defaults name taps 6/12/18/24, but the released
code returned four aliases of the *last* V-V state (fixed upstream in April 2025), and the
maintainers state that every published result and checkpoint uses layer 24 only; ``test.sh`` and
``train.sh`` pass ``--features_list 24`` with the local loss weighted 4 (= the four aliased taps).
Default here: ``taps=(1.0,)`` (the last block) and ``local_loss_weight=4``, which reproduce the
released checkpoints' training and (up to a factor 4 that no metric sees) their maps.
``taps=(0.25, 0.5, 0.75, 1.0)`` gives the four distinct layers 6/12/18/24.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...backbones.clip import Backbone
from ...backbones.dualpath import encode_image_dualpath, first_block_at_fraction
from ...components.losses import image_cross_entropy, segmentation_loss
from ...components.prompt_learning import OBJECT_AGNOSTIC_PROMPTS, LearnablePrompts
from ...components.smoothing import gaussian_blur
from ..base import LearnedDetector
from ..registry import register_method
from .convert import convert_official
from .options import AnomalyCLIPOptions
from ...components.scoring import anomaly_map, cosine_logits, default_image_size, patch_probability_maps, state_probabilities


@register_method("anomalyclip", converter=convert_official)
class AnomalyCLIP(LearnedDetector):
    """AnomalyCLIP, zero-shot with learned object-agnostic prompts. Options: :class:`.AnomalyCLIPOptions`."""

    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    few_shot = False
    Options = AnomalyCLIPOptions
    opts: AnomalyCLIPOptions
    # the official train.py: Adam(lr 1e-3, betas (0.5, 0.999)), 15 epochs, batch 8, seed 111
    training_defaults: ClassVar[dict[str, Any]] = {"epochs": 15, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999), "seed": 111}

    def __init__(self, backbone: Backbone, options: AnomalyCLIPOptions | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, options, **kwargs)
        o = self.opts
        self.tap_layers = backbone.tap_layers(o.taps)
        self.first_vv_block = first_block_at_fraction(backbone.depth, o.dpam_start)
        self.temperature = o.temperature
        self.sigma = o.sigma
        self.local_loss_weight = o.local_loss_weight
        self.global_ln_post = o.global_ln_post
        self.prompts = LearnablePrompts(
            backbone, self.prompt_texts(), o.n_ctx, deep_depth=o.deep_depth, deep_length=o.deep_length, deep_fp16=o.deep_fp16
        )

    @classmethod
    def default_input_size(cls, backbone: Backbone) -> int:
        return default_image_size(backbone.patch_size[0])

    def prompt_texts(self) -> tuple[str, ...]:
        """The learned prompts' templates, (normal, abnormal)."""
        return tuple(OBJECT_AGNOSTIC_PROMPTS)

    # -- learned state -------------------------------------------------------------------------
    def learned_state(self) -> dict[str, torch.Tensor]:
        state = {"prompts.ctx": self.prompts.ctx.detach()}
        if self.prompts.deep is not None:
            state["prompts.deep"] = self.prompts.deep.detach()
        return state

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy learned prompts in. Deep prompt sets beyond the ones this text tower can use
        (an official depth-9 checkpoint on a tower of fewer than 9 layers) are dropped: the
        official forward never reaches them either."""
        own = self.learned_state()
        deep = state.get("prompts.deep")
        if deep is not None and "prompts.deep" in own and deep.shape[0] > own["prompts.deep"].shape[0]:
            state = {**state, "prompts.deep": deep[: own["prompts.deep"].shape[0]]}
        self.copy_learned(
            own, state,
            f"n_ctx={self.prompts.n_ctx}, {self.prompts.n_deep} deep prompt sets, deep_depth / deep_length and the "
            "backbone's text width",
        )

    def reset_parameters(self, seed: int) -> None:
        """Redraw the prompts from N(0, 0.02) with ``seed`` (a fresh training run)."""
        self.prompts.reset_parameters(seed)
        self._text_cache.clear()

    # -- training interface (clipad.train) -----------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.prompts.parameters()]

    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        *,
        class_names: Sequence[str] | None = None,
        references: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch's loss, as the official ``train.py`` (object-agnostic: ``class_names`` and
        ``references`` are not used).

        Args:
            images: [B, 3, S, S] CLIP-normalised images at ``image_size``.
            masks: [B, S, S] {0, 1} anomaly masks (float).
            labels: [B] 0 normal / 1 anomalous.
        Returns:
            (loss, parts): the scalar to minimise and its detached components ``focal``,
            ``dice_abnormal``, ``dice_normal`` (summed over taps, unweighted) and ``image_ce``.
        """
        self._text_cache.clear()
        text = F.normalize(self.prompts(self.backbone).float(), dim=-1)
        with torch.no_grad():
            glob, taps, grid = self.encode_image(images)
        logits = cosine_logits(glob, text, self.temperature, normalize_text=False)
        image_loss = image_cross_entropy(logits, labels.to(logits.device))
        masks = masks.to(logits.device, torch.float32)
        local = torch.zeros((), device=logits.device)
        parts = {"focal": 0.0, "dice_abnormal": 0.0, "dice_normal": 0.0}
        for tokens in taps:
            probs = patch_probability_maps(tokens[:, 1:], text, grid, self.model_size, self.temperature, normalize_text=False)
            focal, dice_a, dice_n = segmentation_loss(probs, masks)
            local = local + focal
            local = local + dice_a
            local = local + dice_n
            parts["focal"] += focal.detach()
            parts["dice_abnormal"] += dice_a.detach()
            parts["dice_normal"] += dice_n.detach()
        loss = self.local_loss_weight * local + image_loss
        return loss, {**parts, "image_ce": image_loss.detach()}

    # -- inference -----------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """[2, D] unit (normal, abnormal) embeddings of the learned prompts (cached)."""

        def compute() -> torch.Tensor:
            with torch.autocast(self.device.type, enabled=False):
                return F.normalize(self.prompts(self.backbone).float(), dim=-1)

        return self.cached_text("anomalyclip-prompts", compute)

    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """Normalised [B, 3, S, S] -> (global [B, D], projected V-V taps [B, 1 + N, D] each, grid)."""
        bb = self.backbone
        feats = encode_image_dualpath(
            bb, x, self.first_vv_block, vv_taps=self.tap_layers, orig_taps=(bb.depth,), pos_interp="bilinear"
        )
        if self.global_ln_post:
            glob = feats.cls
        else:
            cls = feats.orig_taps[bb.depth][:, 0]
            proj = bb.visual.proj
            glob = cls @ proj if proj is not None else cls
        taps = [bb.project(feats.vv_taps[layer]) for layer in self.tap_layers]
        return glob, taps, feats.grid

    def score_batch(self, x, class_name, reference):
        text = self.text_features()
        glob, taps, grid = self.encode_image(x)
        with torch.autocast(self.device.type, enabled=False):
            scores = state_probabilities(glob, text, self.temperature, normalize_text=False)[:, 1]
            maps = torch.stack([
                anomaly_map(patch_probability_maps(t[:, 1:], text, grid, self.model_size, self.temperature, normalize_text=False))
                for t in taps
            ]).sum(dim=0)
            maps = gaussian_blur(maps, self.sigma)
        return scores, maps

