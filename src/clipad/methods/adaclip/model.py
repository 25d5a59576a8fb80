"""AdaCLIP (Cao et al., "AdaCLIP: Adapting CLIP with Hybrid Learnable Prompts for Zero-Shot
Anomaly Detection", ECCV 2024): static and image-conditioned (dynamic) learnable prompts in both
CLIP towers, and a hybrid semantic fusion of the most abnormal patches into the image score.

Behaviour follows the official code (caoyunkang/AdaCLIP @ e27ee32, ``method/adaclip.py``,
``method/trainer.py``, ``loss.py`` as ``test.py`` / ``train.py`` run them: prompting "SD" in both
towers "VL", depth J = 4, length M = 5, HSF with 20 clusters, 518 px, taps 6/12/18/24 of 24):

- backbone: exact GELU MLPs even with OpenAI's QuickGELU-trained weights, because the official
  code rebuilds CLIP from the JSON config (:meth:`AdaCLIP.backbone_options` asks for
  ``config_activation``; an explicit ``quick_gelu=True`` to ``create_detector`` overrides it);
  positional table resized with plain bicubic, no antialias (``pos_interp="bicubic-plain"``);
- dynamic prompts: an unprompted, gradient-free pass of the image tower gives the CLIP image
  embedding g [B, D]; M linear heads per tower map it to M prompt tokens (vision D -> Wv, text
  D -> Wt); the same dynamic tokens serve every prompted layer, added to that layer's static
  prompt (M x W, N(0, 0.02) init);
- image tower (through ``Backbone.encode_image(layer_hook=...)``): before block 0 the M context
  tokens are appended after the CLS and patch rows (after ``ln_pre``, no positional
  embedding), before blocks 1..J-1 they are replaced by that layer's context, afterwards they
  stay and attend through the last block; taps and CLS read the image rows only;
- text tower (``Backbone.encode_text(layer_hook=...)``), run per image because the prompts depend
  on it: block 0 gets no prompts; before blocks 1..J-1 the states at positions 1..M (the first
  words after the start token) are overwritten by that layer's context (static text prompt 0 is
  never used); sentences: 7 normal / 5 abnormal states x 4 templates, state-major, class name with
  ``-`` -> space only; each sentence embedding unit-normalised, averaged per state, renormalised;
- local features: the raw residual stream after each tap (no ``ln_post``), CLS dropped, through a
  per-tap linear Wv -> D, unit-normalised; global feature: the prompted pass's CLIP embedding
  through a linear D -> D, unit-normalised;
- logits ``100 * feature @ text`` (a constant 100, not CLIP's logit scale); map: per-tap logits
  bilinear (``align_corners=True``) to the input size, averaged over taps, softmax,
  ``(p_abnormal + 1 - p_normal) / 2``, Gaussian sigma 4 (:mod:`clipad.components.smoothing`);
- hybrid semantic fusion (:func:`hybrid_semantic_fusion`): the 5 K most abnormal patches (mean
  tap logits, softmax), k-means (K = 20) on their concatenated tap features, each cluster's mean
  over its members' tokens of all taps, the unweighted mean of the K centres, normalised -> h;
  image score ``softmax(100 normalize(0.2 h + 0.8 global) @ text)[abnormal]``;
- training (``trainer.py``): focal(score pair, label) + per tap [focal(softmax of that tap's
  upsampled logits, mask) + dice(abnormal, mask) + dice(normal, 1 - mask)]; AdamW lr 0.01, betas
  (0.5, 0.999), weight decay 0.01, 5 epochs, batch 1, seed 111.

Quirks kept by default, and the option that changes each:

- the prompt contexts are cast with ``.half()`` before insertion, even in float32 runs
  (``prompt_fp16=False`` keeps full precision);
- the official KMeans has ``random_state=None``: image scores depend on numpy's global generator
  and on the order images are processed; here every image is clustered with ``kmeans_seed`` (0)
  (sklearn's KMeans, k-means++, ``n_init="auto"``), so a score is a function of its image. With
  fewer selected patches than clusters (tiny grids) the clusters are capped at the patch count,
  where the official code raises;
- training Dice is computed over image rows: the official code squeezes the batch-1 mask to
  [H, W], so its Dice treats each row as a sample (``dice_rows=False``: per image);
- any batch size: the official code only supports batch 1 (its text prompts broadcast over the
  batch); here the text tower runs once per image, all images in one call;
- the paper describes HSF as picking the most abnormal cluster; the released code (kept) averages
  all cluster centres (``hsf=False`` drops the fusion: the global feature alone);
- released checkpoints were trained and evaluated under CUDA fp16 autocast; this float32 path
  matches the official code run in float32 (``precision`` as for every method);
- the official float32 training step fails in backward (in-place ``x /= x.norm(...)`` on tensors
  autograd needs; fp16 autocast hides it): the same values are computed out of place here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.clip import Backbone
from ...components.losses import dice_loss, focal_loss
from ...components.prompts import compose_prompts
from ...components.scoring import default_image_size
from ...components.smoothing import gaussian_blur
from ...errors import ClipadError
from ..base import LearnedDetector
from ..registry import register_method
from .convert import convert_official
from .options import AdaCLIPOptions

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.")
SCALE = 100.0  # the official constant logit scale
POS_INTERP = "bicubic-plain"  # the official vendored open_clip resizes the table without antialias
TOKENS_PER_CLUSTER = 5  # HSF clusters the 5 K most abnormal patches

Cluster = Callable[[np.ndarray, int], np.ndarray]  # (data [k, F], clusters) -> labels [k]


# --------------------------------------------------------------------------- pure functions


def sentences(class_name: str) -> tuple[list[str], int]:
    """The official prompt sentences of a class -> (normal then abnormal sentences, number normal).

    Only ``-`` becomes a space (``metal_nut`` keeps its underscore); state-major, template-minor."""
    name = class_name.replace("-", " ")
    normal = compose_prompts(name, NORMAL_STATES, TEMPLATES)
    return normal + compose_prompts(name, ABNORMAL_STATES, TEMPLATES), len(normal)


def state_features(embeddings: torch.Tensor, n_normal: int) -> torch.Tensor:
    """Sentence embeddings [B, S, D] (normal ones first) -> [B, D, 2] unit (normal, abnormal)
    columns: each sentence normalised, averaged per state, renormalised (twice, as the official
    layer normalises the stacked result again)."""
    e = embeddings / embeddings.norm(dim=-1, keepdim=True)
    cols = []
    for part in (e[:, :n_normal], e[:, n_normal:]):
        mean = part.mean(dim=1)
        cols.append(mean / mean.norm(dim=-1, keepdim=True))
    return F.normalize(torch.stack(cols, dim=2), dim=1)


def upsample_logits(logits: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Per-patch logits [B, N, 2] on a row-major grid -> [B, 2, H, W], bilinear with
    ``align_corners=True`` (the official map resize)."""
    b = logits.shape[0]
    maps = logits.permute(0, 2, 1).reshape(b, 2, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def anomaly_map_from_logits(logits: Sequence[torch.Tensor], grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Per-tap logits [B, N, 2] -> [B, H, W]: upsampled, averaged over taps, softmax,
    ``(p_abnormal + 1 - p_normal) / 2``."""
    mean = torch.stack([upsample_logits(lg, grid, size) for lg in logits], dim=1).mean(dim=1).softmax(dim=1)
    return ((mean[:, 1:] + 1 - mean[:, 0:1]) / 2.0)[:, 0]


@torch._disable_dynamo  # sklearn on numpy: nothing to compile, and dynamo cannot trace its imports
def kmeans_labels(data: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """sklearn ``KMeans(n_clusters, n_init="auto", random_state=seed).fit_predict(data)`` (k-means++,
    one initialisation, Lloyd), the official clustering with a fixed random state."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # fewer distinct patches than clusters (a blank image): sklearn warns once per image
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=n_clusters, n_init="auto", random_state=seed).fit_predict(data)


def hybrid_semantic_fusion(
    patches: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], n_clusters: int, cluster: Cluster
) -> torch.Tensor:
    """The released HSF: unit patch features [B, N, D] and logits [B, N, 2] per tap -> [B, D].

    The k = min(N, 5 K) patches with the highest abnormal probability of the tap-averaged logits
    are clustered (``cluster`` on their tap features concatenated, [k, taps x D], detached, on the
    CPU) into min(K, k) clusters; a cluster's centre is the mean of its members' features over all
    taps; the result is the normalised unweighted mean of the (non-empty) centres. Differentiable
    w.r.t. ``patches`` (the labels are constants)."""
    prob = torch.stack(list(logits), dim=1).mean(dim=1).softmax(dim=2)[:, :, 1]
    b, n = prob.shape
    k = min(n, TOKENS_PER_CLUSTER * n_clusters)
    idx = prob.topk(k, dim=1).indices
    selected = [p.gather(1, idx.unsqueeze(-1).expand(-1, -1, p.shape[-1])) for p in patches]
    stacked = torch.cat(selected, dim=2)
    clusters = min(n_clusters, k)
    out = []
    for i in range(b):
        labels = cluster(stacked[i].detach().float().cpu().numpy(), clusters)
        labels = torch.as_tensor(np.asarray(labels), device=prob.device, dtype=torch.long)
        members = torch.cat([s[i] for s in selected], dim=0)  # [taps x k, D], tap-major as the official cat
        all_labels = labels.repeat(len(selected))
        # clusters left empty (fewer distinct patches than clusters, e.g. a blank image) are
        # skipped: the official mean over them is NaN
        centres = [members[all_labels == c].mean(dim=0) for c in labels.unique().tolist()]
        out.append(torch.stack(centres).mean(dim=0))
    return F.normalize(torch.stack(out), dim=1)


# --------------------------------------------------------------------------- learned modules


class StaticPrompts(nn.Module):
    """J static prompt sets [M, W] of one tower (``static_prompts.<j>``, the official names)."""

    def __init__(self, depth: int, length: int, width: int) -> None:
        super().__init__()
        self.static_prompts = nn.ParameterList([nn.Parameter(torch.zeros(length, width)) for _ in range(depth)])


class LinearHeads(nn.Module):
    """n independent ``Linear(d_in, d_out)`` with bias (``head.<i>``, the official names)."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.head = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(n))

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d_in] -> [B, n, d_out]: head i gives token i (the dynamic prompt generators)."""
        return torch.stack([h(x) for h in self.head], dim=1)


MODULES = ("text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
           "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator")


# --------------------------------------------------------------------------- the method


@register_method("adaclip", converter=convert_official)
class AdaCLIP(LearnedDetector):
    """AdaCLIP, zero-shot with hybrid learned prompts. Options: :class:`.AdaCLIPOptions`."""

    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    few_shot = False
    Options = AdaCLIPOptions
    opts: AdaCLIPOptions
    # the official train.py: AdamW(lr 0.01, betas (0.5, 0.999), weight decay 0.01), 5 epochs, batch 1, seed 111
    training_defaults: ClassVar[dict[str, Any]] = {"epochs": 5, "batch_size": 1, "lr": 0.01, "betas": (0.5, 0.999),
                                                   "seed": 111, "optimizer": "adamw", "weight_decay": 0.01}

    def __init__(self, backbone: Backbone, options: AdaCLIPOptions | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, options, **kwargs)
        o = self.opts
        clip = backbone.clip
        if getattr(clip, "ln_final", None) is None or getattr(clip, "attn_mask", None) is None:
            raise ClipadError(f"backbone '{backbone.name}' has no causal open_clip text tower; AdaCLIP prompts it")
        self.tap_layers = backbone.tap_layers(o.taps)
        self.depth, self.length = o.prompt_depth, o.prompt_length
        text_width, dim, width = clip.ln_final.weight.shape[0], backbone.embed_dim, backbone.width
        self.text_prompter = StaticPrompts(self.depth, self.length, text_width)
        self.visual_prompter = StaticPrompts(self.depth, self.length, width)
        self.patch_token_layer = LinearHeads(len(self.tap_layers), width, dim)
        self.cls_token_layer = LinearHeads(1, dim, dim)
        self.dynamic_visual_prompt_generator = LinearHeads(self.length, dim, width)
        self.dynamic_text_prompt_generator = LinearHeads(self.length, dim, text_width)
        self._tokens: dict[str, tuple[torch.Tensor, int]] = {}
        self.reset_parameters(0)

    def export_refusal(self) -> str | None:
        return ("adaclip's image score clusters every image's patches with k-means (hybrid semantic fusion), which "
                "has no fixed-graph form; run it with clipad predict / the Python API instead")

    @classmethod
    def default_input_size(cls, backbone: Backbone) -> int:
        return default_image_size(backbone.patch_size[0])

    @classmethod
    def backbone_options(cls, options: AdaCLIPOptions, backbone: str | None = None) -> dict[str, Any]:
        """GELU MLPs whatever the weights were trained with, as the official model (quirk)."""
        return {"config_activation": True}

    # -- learned state -------------------------------------------------------------------------
    def _learned_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{m}.{k}": v for m in MODULES for k, v in getattr(self, m).state_dict(keep_vars=True).items()}

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._learned_tensors().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        self.copy_learned(
            self._learned_tensors(), state,
            f"prompt_depth={self.depth}, prompt_length={self.length}, {len(self.tap_layers)} taps and the backbone's widths",
        )

    def reset_parameters(self, seed: int) -> None:
        """Static prompts from N(0, 0.02), linear layers with PyTorch's default initialisation (as
        the official modules); all drawn from ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            with torch.no_grad():
                for prompter in (self.text_prompter, self.visual_prompter):
                    for p in prompter.static_prompts:
                        p.normal_(0.0, 0.02)
            for m in MODULES[2:]:
                for lin in getattr(self, m).head:
                    lin.reset_parameters()
        self._text_cache.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in MODULES for p in getattr(self, m).parameters()]

    # -- features ------------------------------------------------------------------------------
    def _round(self, ctx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A prompt context [..., M, W] in ``dtype``, rounded to float16 first where the official
        code does (``.half()``). Rounded after broadcasting, as the official code: the gradient
        is then rounded per copy before the copies' contributions are summed."""
        if self.opts.prompt_fp16:
            ctx = ctx.to(torch.float16)
        return ctx.to(dtype)

    def _token_ids(self, class_name: str) -> tuple[torch.Tensor, int]:
        if class_name not in self._tokens:
            texts, n_normal = sentences(class_name)
            self._tokens[class_name] = (self.backbone.tokenize(texts), n_normal)
        return self._tokens[class_name]

    def text_features(self, dynamic: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """Dynamic text prompts [B, M, Wt] and one class name per image -> [B, D, 2] unit
        (normal, abnormal) text features of each image (the text tower runs once for the batch)."""
        b = dynamic.shape[0]
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(class_names):
            groups.setdefault(c, []).append(i)
        out = torch.empty(b, self.backbone.embed_dim, 2, device=dynamic.device)
        static = self.text_prompter.static_prompts
        m = self.length
        for name, rows in groups.items():
            ids, n_normal = self._token_ids(name)
            s = ids.shape[0]
            dyn = dynamic[rows]  # [b', M, Wt]
            all_ids = ids.to(dynamic.device).repeat(len(rows), 1)

            def hook(i: int, x: torch.Tensor, dyn=dyn, s=s) -> torch.Tensor | None:
                if not 1 <= i < self.depth:  # block 0 takes no text prompts (static set 0 is unused)
                    return None
                # one copy per sentence, then rounded: as the official broadcast before .half()
                ctx = (dyn.unsqueeze(1) + static[i]).expand(-1, s, -1, -1).reshape(-1, m, x.shape[-1])
                return torch.cat([x[:, :1], self._round(ctx, x.dtype), x[:, 1 + m :]], dim=1)

            emb = self.backbone.encode_text(all_ids, layer_hook=hook, min_length=1 + m).float()
            out[rows] = state_features(emb.reshape(len(rows), s, -1), n_normal)
        return out

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int], torch.Tensor]:
        """Normalised [B, 3, S, S] -> (unit global feature [B, D], unit patch features per tap
        [B, N, D], grid, dynamic text prompts [B, M, Wt])."""
        bb = self.backbone
        with torch.no_grad():
            g = bb.encode_image(x, pos_interp=POS_INTERP).cls
        dyn_visual = self.dynamic_visual_prompt_generator.stacked(g)
        dyn_text = self.dynamic_text_prompt_generator.stacked(g)
        static = self.visual_prompter.static_prompts
        m, depth = self.length, self.depth

        def hook(i: int, h: torch.Tensor) -> torch.Tensor | None:
            if i >= depth:
                return None  # the last context stays and keeps attending
            ctx = self._round(dyn_visual + static[i], h.dtype)
            return torch.cat([h if i == 0 else h[:, :-m], ctx], dim=1)

        feats = bb.encode_image(x, layers=self.tap_layers, pos_interp=POS_INTERP, layer_hook=hook)
        patches = []
        for head, layer in zip(self.patch_token_layer.head, self.tap_layers):
            t = head(feats.taps[layer][:, 1:])
            patches.append(t / t.norm(dim=-1, keepdim=True))
        glob = self.cls_token_layer.head[0](feats.cls)
        return glob / glob.norm(dim=-1, keepdim=True), patches, feats.grid, dyn_text

    def cluster(self, data: np.ndarray, n_clusters: int) -> np.ndarray:
        """k-means labels of the fusion's selected patches (see :func:`kmeans_labels`)."""
        return kmeans_labels(data, n_clusters, self.opts.kmeans_seed)

    def _heads(self, x: torch.Tensor, class_names: Sequence[str]):
        glob, patches, grid, dyn_text = self.encode(x)
        text = self.text_features(dyn_text, class_names).to(glob.dtype)
        with torch.autocast(self.device.type, enabled=False):
            glob, text = glob.float(), text.float()
            patches = [p.float() for p in patches]
            logits = [SCALE * p @ text for p in patches]
            feature = glob
            if self.opts.hsf:
                alpha = self.opts.hsf_alpha
                fused = hybrid_semantic_fusion(patches, logits, self.opts.n_clusters, self.cluster)
                feature = F.normalize(alpha * fused + (1 - alpha) * glob, dim=1)
            pair = (SCALE * feature.unsqueeze(1) @ text).squeeze(1).softmax(dim=1)
        return pair, logits, grid

    def score_batch(self, x, class_name, reference):
        pair, logits, grid = self._heads(x, [class_name] * x.shape[0])
        with torch.autocast(self.device.type, enabled=False):
            maps = gaussian_blur(anomaly_map_from_logits(logits, grid, self.model_size), self.opts.sigma)
        return pair[:, 1], maps

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
        """One batch's loss, as the official ``train_one_batch`` (``references`` unused).

        Args:
            images: [B, 3, S, S] CLIP-normalised images at ``image_size``.
            masks: [B, S, S] {0, 1} anomaly masks (float).
            labels: [B] 0 normal / 1 anomalous.
            class_names: the B class names (the prompt sentences name them); None = "object".
        Returns:
            (loss, parts): the scalar to minimise and its detached terms ``image_focal``,
            ``focal``, ``dice_abnormal``, ``dice_normal`` (the last three summed over taps).
        """
        b = images.shape[0]
        names = list(class_names) if class_names is not None else ["object"] * b
        pair, logits, grid = self._heads(images, names)
        masks = masks.to(pair.device, torch.float32)
        image_loss = focal_loss(pair, labels.to(pair.device).float())
        parts = {"image_focal": image_loss.detach(), "focal": 0.0, "dice_abnormal": 0.0, "dice_normal": 0.0}
        rows = (b * masks.shape[1], masks.shape[2]) if self.opts.dice_rows else (b, -1)
        seg = torch.zeros((), device=pair.device)
        for lg in logits:
            probs = upsample_logits(lg, grid, self.model_size).softmax(dim=1)
            focal = focal_loss(probs, masks)
            dice_a = dice_loss(probs[:, 1].reshape(rows), masks.reshape(rows))
            dice_n = dice_loss(probs[:, 0].reshape(rows), (1 - masks).reshape(rows))
            seg = seg + (focal + dice_a + dice_n)
            parts["focal"] += focal.detach()
            parts["dice_abnormal"] += dice_a.detach()
            parts["dice_normal"] += dice_n.detach()
        return image_loss + seg, parts
