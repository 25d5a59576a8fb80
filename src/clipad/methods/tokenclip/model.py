"""TokenCLIP (Zhou, Gao, Pang, Wang, Chen, He; arXiv 2510.21171): token-wise prompt learning for
zero-shot anomaly detection, on the AnomalyCLIP base.

No official code exists and only the abstract could be read (``docs/tokenclip.md`` lists what is
known and every choice made here). Everything the paper leaves open follows
:class:`~clipad.methods.anomalyclip.AnomalyCLIP`: backbone, DPAM dual path, taps, deep text
prompts, temperature, map assembly, smoothing, losses, optimiser and training protocol.

What TokenCLIP adds, as implemented:

- **K textual subspaces**: K learnable (normal, abnormal) prompt pairs "[ctx_k] object." /
  "[ctx_k'] damaged object." through the frozen text tower (the deep text prompts are shared),
  giving unit embeddings ``text: [K, 2, D]``. Subspace k is the plane spanned by its pair.
- **Orthogonality** of the K planes, ``orthogonality=``:
  ``"construction"`` (default): block Gram-Schmidt at every forward, each pair projected onto the
  orthogonal complement of the earlier planes and renormalised, so every embedding of subspace k
  is orthogonal to every embedding of subspace l != k (to float rounding); the angle between a
  pair's own normal and abnormal embeddings stays free. ``"penalty"``: the squared cross-subspace
  cosines ``||M o (W W^T)||_F^2`` (W: the 2K unit embeddings, M: ones off the K 2x2 diagonal
  blocks, i.e. ``||W W^T - I||_F^2`` on the cross-subspace entries) added to the loss with
  ``orthogonality_weight``. ``"none"``.
- **Cost** between each patch token and each subspace: ``1 - max(cos(t, w_n,k), cos(t, w_a,k))``
  (``cost="max"``; ``"mean"`` averages the two cosines), in [0, 2].
- **Assignment**: per image and tap, entropic OT (:func:`clipad.ot.sinkhorn`, uniform marginals
  1/N per token and 1/K per subspace, ``epsilon`` 0.05), rows rescaled to sum to 1, then each
  token keeps its ``topk`` largest entries, renormalised (:func:`clipad.ot.topk_mask`).
  ``assignment="softmax"`` (ablation) replaces OT by a row softmax of ``-cost / epsilon`` (no
  subspace marginal). The plan is a fixed assignment (no gradient) unless ``plan_grad=True``.
- **Token probability** ``p(t) = sum_k A[t, k] softmax(cos(t, [w_n,k, w_a,k]) / 0.07)``; maps as
  AnomalyCLIP: ``(p_a + 1 - p_n) / 2`` per tap, bilinear, summed over taps, Gaussian sigma 4.
- **Image score**: the global feature scored by each subspace as AnomalyCLIP does, then averaged
  over the K subspaces (``image_score="mean"``: what the uniform subspace marginal gives a lone
  token); ``"affinity"`` weights the subspaces by the top-k softmax of ``-cost / epsilon`` of the
  global feature instead.

With ``n_subspaces=1`` every token is assigned wholly to the one subspace and TokenCLIP computes
AnomalyCLIP's function (same prompt parameters, same outputs); ``tests/unit/methods/tokenclip/test_tokenclip.py`` checks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import ot
from ...backbones.clip import Backbone
from ...errors import ClipadError
from ...components.losses import segmentation_loss
from ...components.prompt_learning import OBJECT_AGNOSTIC_PROMPTS
from ...components.scoring import anomaly_map, token_maps
from ...components.smoothing import gaussian_blur
from ..anomalyclip.model import AnomalyCLIP
from ..registry import register_method
from .options import TokenCLIPOptions

ORTHOGONALITY = ("construction", "penalty", "none")
ASSIGNMENTS = ("ot", "softmax")
COSTS = ("max", "mean")
IMAGE_SCORES = ("mean", "affinity")
_NORM_EPS = 1e-12


# --------------------------------------------------------------------------- pure functions


def _orthonormal_rows(v: torch.Tensor) -> torch.Tensor:
    """[R, D] linearly independent rows -> [R, D] orthonormal basis of their span (Gram-Schmidt)."""
    rows: list[torch.Tensor] = []
    for r in v:
        for q in rows:
            r = r - (r @ q) * q
        rows.append(r / r.norm().clamp_min(_NORM_EPS))
    return torch.stack(rows)


def orthogonalize_subspaces(text: torch.Tensor) -> torch.Tensor:
    """Make the K planes spanned by the (normal, abnormal) pairs mutually orthogonal.

    Block Gram-Schmidt in subspace order: subspace 0 is returned as is; subspace k's two vectors
    are projected onto the orthogonal complement of the planes of subspaces 0..k-1 and
    renormalised. Projection runs twice ("twice is enough"), which keeps cross-subspace inner
    products at float rounding (~1e-7 in float32) rather than at the first pass's error.
    Differentiable.

    Args:
        text: [K, 2, D] unit (normal, abnormal) embeddings, 2K <= D, each pair linearly independent.
    Returns:
        [K, 2, D] unit embeddings with ``out[k, i] . out[l, j] ~ 0`` for every k != l.
    """
    k, two, d = text.shape
    if 2 * k > d:
        raise ClipadError(f"{k} orthogonal 2-d subspaces need 2K <= D = {d}; use n_subspaces <= {d // 2}")
    out = [text[0]]
    basis = _orthonormal_rows(text[0])  # [2, D]
    for i in range(1, k):
        v = text[i]
        for _ in range(2):
            v = v - (v @ basis.T) @ basis
        v = F.normalize(v, dim=-1, eps=_NORM_EPS)
        out.append(v)
        basis = torch.cat([basis, _orthonormal_rows(v)])
    return torch.stack(out)


def cross_subspace_cosines(text: torch.Tensor) -> torch.Tensor:
    """[K, 2, D] unit embeddings -> [2K, 2K] Gram matrix with the K 2x2 diagonal blocks zeroed:
    the inner products between embeddings of different subspaces."""
    k = text.shape[0]
    w = text.reshape(2 * k, -1)
    gram = w @ w.T
    block = torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool, device=text.device)] * k)
    return gram.masked_fill(block, 0.0)


def orthogonality_penalty(text: torch.Tensor) -> torch.Tensor:
    """[K, 2, D] unit embeddings -> scalar ``sum_{k != l} ||U_k U_l^T||_F^2``: ``||W W^T - I||_F^2``
    over the cross-subspace entries (a pair's own normal/abnormal cosine is not penalised)."""
    return cross_subspace_cosines(text).square().sum()


def subspace_cosines(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, N, D] tokens, [K, 2, D] unit text -> [B, N, K, 2] cosines (one matrix product)."""
    f = F.normalize(tokens.float(), dim=-1)
    k = text.shape[0]
    sims = f @ text.float().reshape(2 * k, -1).T  # [B, N, 2K]
    # reshape with explicit sizes rather than unflatten: an ONNX export then knows the rank
    return sims.reshape(sims.shape[0], sims.shape[1], k, 2)


def subspace_cost(cos: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """[B, N, K, 2] cosines -> [B, N, K] cost in [0, 2]: ``1 - max`` (or ``1 - mean``) over the
    subspace's (normal, abnormal) pair."""
    sim = cos.amax(dim=-1) if reduce == "max" else cos.mean(dim=-1)
    return 1.0 - sim


def mix_probabilities(assign: torch.Tensor, cos: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, N, K] assignment (rows sum to 1), [B, N, K, 2] cosines -> [B, N, 2] (normal, abnormal)
    probabilities ``sum_k A_k softmax(cos_k / temperature)``."""
    probs = (cos / temperature).softmax(dim=-1)
    return (assign.unsqueeze(-1) * probs).sum(dim=-2)


@register_method("tokenclip")
class TokenCLIP(AnomalyCLIP):
    """TokenCLIP: K orthogonal learnable textual subspaces, OT token assignment, top-k masking.
    Options: :class:`.TokenCLIPOptions` (AnomalyCLIP's plus TokenCLIP's own)."""

    Options = TokenCLIPOptions
    opts: TokenCLIPOptions

    def __init__(self, backbone: Backbone, options: TokenCLIPOptions | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, options, **kwargs)
        o = self.opts
        k = o.n_subspaces
        dim = backbone.clip.text_projection.shape[-1] if isinstance(backbone.clip.text_projection, torch.Tensor) else None
        if o.orthogonality == "construction" and dim is not None and 2 * k > dim:
            raise ClipadError(f"{k} orthogonal subspaces need 2 x n_subspaces <= the embedding width {dim}")
        self.n_subspaces = k
        self.topk = o.topk
        self.assignment = o.assignment
        self.orthogonality = o.orthogonality
        self.orthogonality_weight = o.orthogonality_weight
        self.cost = o.cost
        self.epsilon = o.epsilon
        self.ot_iters = o.ot_iters
        self.ot_tol = o.ot_tol
        self.ot_check_every = o.ot_check_every
        self.plan_grad = o.plan_grad
        self.image_score = o.image_score

    def prompt_texts(self) -> tuple[str, ...]:
        """Row 2k / 2k + 1: normal / abnormal prompt of subspace k. Drawn in that order from one
        seeded generator, so subspace 0 starts where AnomalyCLIP's prompts start."""
        return tuple(OBJECT_AGNOSTIC_PROMPTS) * self.opts.n_subspaces

    # -- learned state -------------------------------------------------------------------------
    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        ctx = state.get("prompts.ctx")
        if ctx is not None and ctx.shape[0] != 2 * self.n_subspaces:
            raise ClipadError(
                f"tokenclip learned weights hold {ctx.shape[0] // 2} subspace(s) ('prompts.ctx' {tuple(ctx.shape)}), "
                f"this detector has n_subspaces={self.n_subspaces}; build it with n_subspaces={ctx.shape[0] // 2}"
            )
        super().load_learned_state(state)

    # -- text side -----------------------------------------------------------------------------
    def subspace_text(self) -> torch.Tensor:
        """[K, 2, D] unit (normal, abnormal) embeddings of the K subspaces, orthogonalised when
        ``orthogonality="construction"``; differentiable (training) — see :meth:`text_features`."""
        text = F.normalize(self.prompts(self.backbone).float(), dim=-1).unflatten(0, (self.n_subspaces, 2))
        if self.orthogonality == "construction" and self.n_subspaces > 1:
            text = orthogonalize_subspaces(text)
        return text

    def text_features(self) -> torch.Tensor:
        """[K, 2, D] :meth:`subspace_text`, cached for inference."""

        def compute() -> torch.Tensor:
            with torch.autocast(self.device.type, enabled=False):
                return self.subspace_text()

        return self.cached_text("tokenclip-subspaces", compute)

    # -- assignment ----------------------------------------------------------------------------
    def token_assignment(self, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cost [B, N, K] (one problem per image and tap) -> (assignment [B, N, K], raw).

        ``assignment``: top-k masked, rows summing to 1. ``raw``: the Sinkhorn plan before row
        normalisation (rows sum to 1/N, columns to 1/K), or the softmax, or None when K = 1
        (every token then belongs wholly to the one subspace: exactly AnomalyCLIP).
        """
        if self.n_subspaces == 1:
            return torch.ones_like(cost), None
        if not self.plan_grad:
            cost = cost.detach()
        if self.assignment == "ot":
            raw = ot.sinkhorn(
                cost, epsilon=self.epsilon, max_iter=self.ot_iters, tol=self.ot_tol, check_every=self.ot_check_every,
                grad="unrolled" if self.plan_grad else "none",
            ).plan
        else:
            raw = ot.softmax_assignment(cost, temperature=self.epsilon)
        return ot.topk_mask(raw, self.topk), raw

    def token_probabilities(self, taps: Sequence[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Projected taps ([B, 1 + N, D] each, CLS first) -> per tap [B, N, 2] (normal, abnormal)
        probabilities through each token's subspace combination; one batched OT over all taps."""
        cos = subspace_cosines(torch.cat([t[:, 1:] for t in taps]), text)  # [T*B, N, K, 2]
        assign, _ = self.token_assignment(subspace_cost(cos, self.cost))
        probs = mix_probabilities(assign, cos, self.temperature)  # [T*B, N, 2]
        return list(probs.reshape(len(taps), -1, *probs.shape[1:]).unbind(0))

    def image_log_probabilities(self, glob: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Global features [B, D] -> [B, 2] log (normal, abnormal) probabilities: the K subspaces'
        AnomalyCLIP probabilities mixed uniformly ("mean") or by top-k affinity ("affinity")."""
        cos = subspace_cosines(glob[:, None], text)[:, 0]  # [B, K, 2]
        logp = (cos / self.temperature).log_softmax(dim=-1)
        return torch.logsumexp(self._image_log_weights(cos)[..., None] + logp, dim=1)

    def image_probabilities(self, glob: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Global features [B, D] -> [B, 2] (normal, abnormal) probabilities, the exponential of
        :meth:`image_log_probabilities` computed directly (for K = 1: AnomalyCLIP's score)."""
        cos = subspace_cosines(glob[:, None], text)[:, 0]  # [B, K, 2]
        probs = (cos / self.temperature).softmax(dim=-1)
        if self.image_score == "mean" or self.n_subspaces == 1:
            return probs.mean(dim=1)
        return (self._image_log_weights(cos).exp()[..., None] * probs).sum(dim=1)

    def _image_log_weights(self, cos: torch.Tensor) -> torch.Tensor:
        """[B, K, 2] cosines of the global features -> [B, K] log mixture weights of the subspaces."""
        b, k = cos.shape[:2]
        if self.image_score == "mean" or k == 1:
            return torch.full((b, k), -math.log(k), device=cos.device, dtype=cos.dtype)
        cost = subspace_cost(cos[:, None], self.cost)  # [B, 1, K]
        if not self.plan_grad:
            cost = cost.detach()
        w = ot.topk_mask(ot.softmax_assignment(cost, temperature=self.epsilon), self.topk)[:, 0]
        # masked subspaces get -inf (dropped by logsumexp); the clamp keeps their gradient at 0, not NaN
        return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), torch.full_like(w, -math.inf))

    # -- training interface (clipad.train) -----------------------------------------------------
    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        *,
        class_names: Sequence[str] | None = None,
        references: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """AnomalyCLIP's loss on TokenCLIP's maps and scores, plus the orthogonality penalty.

        Args:
            images: [B, 3, S, S] CLIP-normalised images at ``image_size``.
            masks: [B, S, S] {0, 1} anomaly masks (float).
            labels: [B] 0 normal / 1 anomalous.
        Returns:
            (loss, parts): ``local_loss_weight x sum over taps (focal + dice_a + dice_n) +
            image_ce (+ orthogonality_weight x penalty)``; parts are detached: ``focal``,
            ``dice_abnormal``, ``dice_normal``, ``image_ce`` and ``orthogonality`` (the penalty's
            value in every mode, a diagnostic).
        """
        self._text_cache.clear()
        text = self.subspace_text()
        with torch.no_grad():
            glob, taps, grid = self.encode_image(images)
        logp = self.image_log_probabilities(glob.float(), text)
        # cross-entropy of the mixture probability; for K = 1 it is AnomalyCLIP's
        # cross_entropy(logits) (log_softmax of the same logits)
        image_loss = F.nll_loss(logp, labels.to(logp.device).long())
        masks = masks.to(logp.device, torch.float32)
        local = torch.zeros((), device=logp.device)
        parts: dict[str, Any] = {"focal": 0.0, "dice_abnormal": 0.0, "dice_normal": 0.0}
        for probs in self.token_probabilities(taps, text):
            focal, dice_a, dice_n = segmentation_loss(token_maps(probs, grid, self.model_size), masks)
            local = local + focal + dice_a + dice_n
            parts["focal"] += focal.detach()
            parts["dice_abnormal"] += dice_a.detach()
            parts["dice_normal"] += dice_n.detach()
        loss = self.local_loss_weight * local + image_loss
        penalty = orthogonality_penalty(text) if self.n_subspaces > 1 else torch.zeros((), device=logp.device)
        if self.orthogonality == "penalty":
            loss = loss + self.orthogonality_weight * penalty
        return loss, {**parts, "image_ce": image_loss.detach(), "orthogonality": penalty.detach()}

    # -- inference -----------------------------------------------------------------------------
    def score_batch(self, x, class_name, reference):
        text = self.text_features()
        glob, taps, grid = self.encode_image(x)
        with torch.autocast(self.device.type, enabled=False):
            scores = self.image_probabilities(glob.float(), text)[:, 1]
            maps = torch.stack(
                [anomaly_map(token_maps(p, grid, self.model_size)) for p in self.token_probabilities(taps, text)]
            ).sum(dim=0)
            maps = gaussian_blur(maps, self.sigma)
        return scores, maps
