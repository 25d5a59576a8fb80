"""WinCLIP (Jeong et al., CVPR 2023): zero-/few-shot anomaly classification and segmentation.

Behaviour follows anomalib's ``WinClipModel``, the reference implementation:

- text: compositional prompt ensemble (7 normal x 21 templates, 4 anomalous x 21), the mean of
  raw embeddings per state; ``softmax(cos / 0.07)`` over (normal, anomalous);
- image score (zero-shot): anomalous probability of the CLS embedding;
- windows: for each scale k (default 2 and 3 patches), every k x k window of patch tokens (stride
  1) together with the CLS token is run through the whole image tower as its own sequence, taking
  the token embeddings before ``ln_pre``; the window embedding is its pooled CLS;
- zero-shot map: per-patch harmonic mean of the scores of the windows covering it, per scale,
  then the harmonic mean over {image score, scale maps};
- few-shot: the minimum cosine distance / 2 of each query patch token (final layer, ``ln_post``,
  not projected) and of each window embedding to the reference memory, per scale harmonically
  aggregated like the zero-shot scores, averaged over scales; map = (zero-shot + few-shot) / 2,
  score = (image score + max of the few-shot map) / 2;
- maps upsampled bilinearly to the model input size.

anomalib's code transposes window sequences to sequence-first before calling the transformer,
which was right for the open_clip releases it pins (< 2.26.1) and wrong for later ones where the
transformer is batch-first (anomalib issue #2571: every window then gets the same embedding).
clipad computes each window as its own sequence, i.e. anomalib's behaviour with the open_clip it
declares; the fidelity test reproduces that setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones.clip import Backbone
from ...errors import ClipadError
from ...backbones.precision import float32_head
from ...components.prompts import WINCLIP_ANOMALOUS_STATES, WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES, state_embeddings
from ...components.scoring import harmonic_mean, state_probabilities, token_maps
from ..base import Detector
from ..registry import register_method
from .options import WinCLIPOptions


def window_indices(grid: tuple[int, int], k: int, stride: int = 1) -> torch.Tensor:
    """[M, k*k] patch indices (row-major grid) of every k x k window, windows in row-major order."""
    gh, gw = grid
    if k > gh or k > gw:
        raise ClipadError(f"window scale {k} is larger than the patch grid {gh}x{gw}")
    ids = torch.arange(gh * gw, dtype=torch.float32).reshape(1, 1, gh, gw)
    return F.unfold(ids, kernel_size=k, stride=stride)[0].T.long()


def covering_windows(windows: torch.Tensor, n_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each patch, the windows that contain it: (index [P, C], valid [P, C]) padded to C."""
    m, _ = windows.shape
    cover = torch.zeros(n_patches, m, dtype=torch.bool)
    cover.scatter_(0, windows.T, True)
    counts = cover.sum(1)
    c = int(counts.max())
    order = torch.argsort((~cover).to(torch.int8), dim=1, stable=True)[:, :c]
    valid = torch.arange(c)[None, :] < counts[:, None]
    return order, valid


def harmonic_aggregation(window_scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, M] window scores -> [B, P] per-patch harmonic mean over the windows covering it.

    A zero score makes the harmonic mean 0 (the reference maps the resulting inf to 0 likewise).
    """
    inv = (1.0 / window_scores)[:, index]  # [B, P, C]
    total = torch.where(valid, inv, torch.zeros((), dtype=inv.dtype, device=inv.device)).sum(-1)
    return (valid.sum(-1).to(total.dtype) / total).nan_to_num(posinf=0.0)


@float32_head
def min_cosine_distance(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """[B, N, D] query, [K, M, D] memory -> [B, N] min over all K*M of (1 - cos) / 2."""
    mem = F.normalize(memory.reshape(-1, memory.shape[-1]).float(), dim=-1)
    sim = F.normalize(query.float(), dim=-1) @ mem.T
    return (1.0 - sim).amin(dim=-1) / 2.0


@register_method("winclip")
class WinCLIP(Detector):
    """WinCLIP zero-shot, and k-shot with ``set_reference``. Options: :class:`.WinCLIPOptions`."""

    default_backbone = "ViT-B-16-plus-240"
    default_pretrained = "laion400m_e31"
    few_shot = True
    Options = WinCLIPOptions
    opts: WinCLIPOptions

    def __init__(self, backbone: Backbone, options: WinCLIPOptions | None = None, **kwargs) -> None:
        super().__init__(backbone, options, **kwargs)
        self.scales = self.opts.scales
        self.temperature = self.opts.temperature
        self.window_chunk = self.opts.window_chunk
        ph, pw = backbone.patch_size
        self.grid = (self.image_size // ph, self.image_size // pw)
        n = self.grid[0] * self.grid[1]
        for i, k in enumerate(self.scales):
            win = window_indices(self.grid, k)
            idx, valid = covering_windows(win, n)
            # CLS (index 0) leads every window sequence; patch tokens are offset by one.
            seq = torch.cat([torch.zeros(len(win), 1, dtype=torch.long), win + 1], dim=1)
            self.register_buffer(f"_seq_{i}", seq, persistent=False)
            self.register_buffer(f"_cover_{i}", idx, persistent=False)
            self.register_buffer(f"_valid_{i}", valid, persistent=False)

    def _scale_buffers(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return getattr(self, f"_seq_{i}"), getattr(self, f"_cover_{i}"), getattr(self, f"_valid_{i}")

    def text_embeddings(self, class_name: str) -> torch.Tensor:
        """[2, D] (normal, anomalous) mean prompt embeddings for ``class_name``, cached."""
        return self.cached_text(
            class_name,
            lambda: state_embeddings(
                self.backbone, class_name, (WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES), WINCLIP_TEMPLATES
            ),
        )

    def _window_embeddings(self, embeds: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, W] token embeddings, [M, L] sequences -> [B, M, D] window embeddings."""
        b = embeds.shape[0]
        m, length = seq.shape
        gathered = embeds[:, seq.reshape(-1)].reshape(b * m, length, -1)
        out = [self.backbone.encode_sequences(gathered[i : i + self.window_chunk]) for i in range(0, b * m, self.window_chunk)]
        return torch.cat(out).reshape(b, m, -1)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """-> (CLS [B, D], patch tokens [B, N, W], window embeddings per scale [B, M_k, D])."""
        feats = self.backbone.encode_image(x, keep_embeds=True)
        if feats.grid != self.grid:
            raise ClipadError(f"patch grid {feats.grid} differs from the configured {self.grid}")
        windows = [self._window_embeddings(feats.embeds, self._scale_buffers(i)[0]) for i in range(len(self.scales))]
        return feats.cls, feats.tokens, windows

    def encode_reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, tokens, windows = self._features(x)
        memory = {"patches": tokens, "shots": torch.tensor(x.shape[0])}
        memory.update({f"windows_{k}": w for k, w in zip(self.scales, windows)})
        return memory

    def score_batch(self, x, class_name, reference):
        text = self.text_embeddings(class_name)
        cls, tokens, windows = self._features(x)
        b = x.shape[0]
        image_scores = state_probabilities(cls, text, self.temperature)[..., 1]

        per_scale = [image_scores[:, None].expand(b, self.grid[0] * self.grid[1])]
        for i, w in enumerate(windows):
            _, idx, valid = self._scale_buffers(i)
            per_scale.append(harmonic_aggregation(state_probabilities(w, text, self.temperature)[..., 1], idx, valid))
        zero_shot = harmonic_mean(per_scale)  # over {image score, scale maps}
        amap, scores = zero_shot, image_scores

        if reference is not None:
            few = [min_cosine_distance(tokens, reference["patches"])]
            for i, (k, w) in enumerate(zip(self.scales, windows)):
                _, idx, valid = self._scale_buffers(i)
                few.append(harmonic_aggregation(min_cosine_distance(w, reference[f"windows_{k}"]), idx, valid))
            few_shot = torch.stack(few).mean(dim=0)
            amap = (zero_shot + few_shot) / 2
            scores = (image_scores + few_shot.amax(dim=-1)) / 2

        amap = token_maps(amap[..., None], self.grid, self.model_size)[:, 0]
        return scores, amap
