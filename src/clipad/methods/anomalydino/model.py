"""AnomalyDINO (Damm, Laszkiewicz, Lederer, Fischer: "AnomalyDINO: Boosting Patch-based Few-shot
Anomaly Detection with DINOv2", WACV 2025). Official code: github.com/dammsi/AnomalyDINO @ b3435f0
(``run_anomalydino.py``, ``src/detection.py``, ``src/backbones.py``, ``src/utils.py``); README:
1-shot MVTec AD image AUROC 96.6 (DINOv2 ViT-S/14, 448 px).

Pipeline (defaults = the official ``run_anomalydino.py`` defaults):

- preprocessing: the smaller image edge resized to ``image_size`` (448; bicubic, antialiased), the
  long edge ``int(448 * long / short)``, ImageNet normalisation, then a **top-left** crop to a
  multiple of the patch size (14);
- features: the final patch tokens after DINOv2's last norm (``get_intermediate_layers(n=1)``), fp32;
- memory (``set_reference``): every patch of every reference, with the 8 rotations of each
  reference when rotation is on (:mod:`.rotation`), L2-normalised;
- test: the PCA foreground mask when masking is on (:mod:`.masking`); each kept patch's distance is
  the mean over its ``k_neighbors`` nearest references of ``1 - cos``, computed as faiss computes
  it on normalised vectors (``(|x|^2 + |y|^2 - 2 x.y)`` clamped at 0, halved); masked patches get 0;
- image score: the mean of the ``int(0.01 N)`` largest patch distances (N counts masked patches);
- map: the patch grid bilinearly resized (half-pixel) to the *original* image size, then a
  Gaussian of sigma 4 px at that size (scipy ``reflect`` borders).

Masking and rotation per category (the official ``get_dataset_info``), when ``masking`` /
``rotation`` are None, from ``preprocess`` and the class name (``"metal nut"`` = ``metal_nut``):

- ``agnostic`` (default): MVTec AD masks capsule, hazelnut, pill, screw and toothbrush; VisA masks
  every category; every category is rotated;
- ``informed``: masking as agnostic; MVTec rotates hazelnut and screw only, VisA nothing;
- ``masking_only``: masking as agnostic, no rotation; ``*_no_mask``: as agnostic / informed without masking;
- a class outside both datasets: no masking (the PCA rule assumes a centred object on a
  background), rotation as the table's default for every category (agnostic: on).

Quirks of the official code (faithful by default; the option that changes it):

1. Rotation centre (W/2, H/2), not ((W-1)/2, (H-1)/2): 90-degree rotations are shifted by one
   pixel with a reflected first row (reproduced; measured effect of exact rot90: 1.2e-2 in score).
2. Rotation on uint8 with reflect-101 borders, rounded back to uint8 (reproduced, :mod:`.rotation`).
3. The mask's dilation and closing run along raster order on the (N, 1) column, not on the grid
   (``mask_morphology="grid"`` uses the grid; changes ~40 kept patches per image).
4. The mask's sign depends on the PCA sign convention and the centre box; threshold absolute
   (reproduced with an exact PCA and sklearn >= 1.5's sign rule).
5. Only test images are masked; masked patches score 0 and still count in N for the top 1 %.
6. DINOv2's positional embedding is resized with ``scale_factor`` and the +0.1 offset (reproduced
   by :mod:`clipad.backbones.dinov2`).
7. The map is blurred at the original image size, after resizing (reproduced by
   :meth:`AnomalyDINO.finish_maps` in ``predict``; ``score_normalized`` finishes at the model input size).
8. Aspect-keeping resize and top-left crop; the map covers the cropped area but is stretched over
   the whole original (reproduced; ``resize="square"`` resizes to a square instead).
9. The official runs draw the randomized PCA from NumPy's unseeded global RNG (not bit-reproducible);
   clipad's exact PCA is deterministic.
10. Official GPU runs use faiss on the GPU and an fp32 backbone. clipad's ``precision="auto"``
    runs the backbone in bf16 on CUDA (``precision="fp32"`` for the official numbers); distances,
    PCA and scores are always fp32 / fp64.

What differs from the official code: the resize of images whose size differs from the model input
runs in torch on float pixels (bicubic, antialiased); torchvision's ``Resize`` on a PIL image rounds
the result to uint8 (at most half a level per pixel). Images already at the input size (a 448 x 448
original) pass through both unchanged.

Why no faiss: ``IndexFlatL2`` is exact brute force, i.e. one matrix product per query batch; at the
official sizes (1,024 query patches x 8,192 reference patches per shot x 384) that is < 7 GFLOP per
image, milliseconds as a GEMM on any GPU and well under a second on a CPU, so a batched matrix
product on the detector's device (chunked by ``memory_chunk``) does the same without a dependency
whose GPU build does not install from PyPI, and without a host round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...backbones.precision import float32_head
from ...components.smoothing import gaussian_blur
from ...data.transforms import ImageInput, as_image_list, equal_runs, resize_batch, resize_map
from ...errors import ClipadError
from ..base import Detector
from ..registry import register_method
from .masking import foreground_mask
from .options import AnomalyDINOOptions
from .rotation import rotations

OFFICIAL_COMMIT = "b3435f0"

MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper")
MVTEC_MASKED = ("capsule", "hazelnut", "pill", "screw", "toothbrush")
MVTEC_INFORMED_ROTATION = ("hazelnut", "screw")
VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
        "pipe_fryum")


def category_key(class_name: str | None) -> str:
    """``"Metal Nut"`` / ``"metal-nut"`` -> ``"metal_nut"`` (the official category spelling)."""
    return (class_name or "").strip().lower().replace(" ", "_").replace("-", "_")


def category_settings(class_name: str | None, preprocess: str) -> tuple[bool, bool]:
    """(masking, rotation) of the official ``get_dataset_info`` table ``preprocess`` for a class."""
    c = category_key(class_name)
    no_mask = preprocess.endswith("_no_mask")
    base = preprocess.removesuffix("_no_mask")
    if c in MVTEC:
        masking = c in MVTEC_MASKED
        rotation = base == "agnostic" or (base == "informed" and c in MVTEC_INFORMED_ROTATION)
    elif c in VISA:
        masking, rotation = True, base == "agnostic"
    else:
        masking, rotation = False, base == "agnostic"
    return masking and not no_mask, rotation


@float32_head
def knn_cosine_distance(query: torch.Tensor, memory: torch.Tensor, k: int = 1, chunk: int = 1 << 25) -> torch.Tensor:
    """[Q, D] queries, [M, D] L2-normalised memory -> [Q] mean over the k nearest of ``1 - cos``.

    The distance faiss's ``IndexFlatL2`` computes for normalised vectors, halved:
    ``(|x|^2 + |y|^2 - 2 x.y)`` clamped at 0. Per block of at most ``chunk`` query x memory
    entries, ``|y|^2 - 2 x.y`` is one GEMM (``addmm``) and a running k-smallest keeps memory
    bounded for any number of references; ``|x|^2`` is added and the clamp applied after the
    selection (both monotone, so the selection is the same).
    """
    q = F.normalize(query, dim=-1)
    step = max(1, chunk // max(1, q.shape[0]))
    best: torch.Tensor | None = None
    for start in range(0, memory.shape[0], step):
        m = memory[start : start + step]
        d = torch.addmm((m * m).sum(-1)[None, :].expand(q.shape[0], -1), q, m.T, alpha=-2.0)
        if best is not None:
            d = torch.cat([best, d], dim=1)
        best = d.amin(dim=1, keepdim=True) if k == 1 else d.topk(min(k, d.shape[1]), dim=1, largest=False).values
    if best is None or best.shape[1] < k:
        raise ClipadError(f"k_neighbors={k} exceeds the {memory.shape[0]} reference patches of the memory")
    return (best + (q * q).sum(-1, keepdim=True)).clamp_min_(0.0).mean(dim=1) / 2.0


def top_percent_score(distances: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """[B, N] patch distances -> [B] mean of the ``int(fraction * N)`` largest (the max when 0),
    accumulated in float64 (the official ``mean_top1p``)."""
    n = distances.shape[-1]
    k = int(n * fraction)
    if k == 0:
        return distances.amax(dim=-1)
    return distances.topk(k, dim=-1).values.double().mean(dim=-1).to(distances.dtype)


@register_method("anomalydino")
class AnomalyDINO(Detector):
    """AnomalyDINO k-shot: ``set_reference`` then ``predict``. Options: :class:`.AnomalyDINOOptions`.

    Example::

        det = clipad.create_detector("anomalydino")              # dinov2_vits14, lvd142m, 448 px
        det.set_reference(good_images, class_name="hazelnut")   # rotations per the official table
        pred = det.predict(test_images, class_name="hazelnut")  # masking per the official table
    """

    default_backbone = "dinov2_vits14"
    default_pretrained = "lvd142m"
    few_shot = True
    needs_reference = True
    backbone_families = ("dinov2",)
    Options = AnomalyDINOOptions
    opts: AnomalyDINOOptions

    def export_refusal(self) -> str | None:
        return ("anomalydino masks the background with a PCA of every test image (an SVD, which ONNX has no operator "
                "for); run it with clipad predict / the Python API instead")

    @classmethod
    def default_input_size(cls, backbone) -> int:
        return 448

    # -- settings per class --------------------------------------------------------------------
    def masking_for(self, class_name: str | None) -> bool:
        """Whether test images of ``class_name`` are masked (option, else the official table)."""
        if self.opts.masking is not None:
            return self.opts.masking
        return category_settings(class_name, self.opts.preprocess)[0]

    def rotation_for(self, class_name: str | None) -> bool:
        """Whether references of ``class_name`` are augmented by rotation (option, else the table)."""
        if self.opts.rotation is not None:
            return self.opts.rotation
        return category_settings(class_name, self.opts.preprocess)[1]

    # -- preprocessing -------------------------------------------------------------------------
    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of an image -> the resized (h, w): smaller edge to ``image_size``, long edge
        ``int(image_size * long / short)`` (torchvision's ``Resize(int)``); the top-left crop to a
        multiple of the patch size happens in :meth:`score_batch`."""
        if self.opts.resize == "square":
            return self.model_size
        h, w = size
        s = self.image_size
        return (int(s * h / w), s) if w <= h else (s, int(s * w / h))

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        p = self.backbone.patch_size[0]
        h, w = x.shape[-2:]
        if h < p or w < p:
            raise ClipadError(f"input {h}x{w} is smaller than one {p}x{p} patch; raise image_size")
        return x[..., : h - h % p, : w - w % p]

    def patch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised [B, 3, H, W] -> (final patch tokens [B, N, D], grid) of the top-left crop."""
        feats = self.backbone.encode_image(self._crop(x))
        return feats.tokens, feats.grid

    # -- references ----------------------------------------------------------------------------
    def encode_reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised references [K, 3, H, W] -> {"patches": [K * N, D] L2-normalised, "shots"}
        (no rotation: that needs the raw pixels, see :meth:`set_reference`)."""
        tokens, _ = self.patch_features(x)
        patches = F.normalize(tokens.float().reshape(-1, tokens.shape[-1]), dim=-1)
        return {"patches": patches, "shots": torch.tensor(x.shape[0])}

    def set_reference(self, images: torch.Tensor | Sequence[ImageInput] | ImageInput, class_name: str | None = None) -> None:
        """Build the memory of ``class_name`` (None: every class without its own) from normal
        images: every patch of every image, and of its 8 rotations when :meth:`rotation_for` the
        class says so (rotated at the image's own size, before resizing, as the official code)."""
        tensors = as_image_list(images)
        rotate = self.rotation_for(class_name)
        patches = []
        with torch.no_grad(), self.autocast():
            for i, j in equal_runs([tuple(t.shape[-2:]) for t in tensors]):
                for start in range(i, j, 8 if rotate else 64):  # bounded batches of views
                    part = torch.stack(tensors[start : min(j, start + (8 if rotate else 64))]).to(self.device)
                    views = rotations(part) if rotate else part
                    size = self.input_size(tuple(views.shape[-2:]))
                    x = self.backbone.normalize(resize_batch(list(views), size, self.device).float())
                    patches.append(self.encode_reference(x)["patches"])
        self._references[class_name or ""] = {"patches": torch.cat(patches).float(), "shots": torch.tensor(len(tensors))}

    # -- scoring -------------------------------------------------------------------------------
    def patch_distances(self, x: torch.Tensor, class_name: str, reference: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised [B, 3, H, W] -> [B, gh, gw] float32 patch distances (masked patches 0)."""
        tokens, grid = self.patch_features(x)
        b, n, d = tokens.shape
        dist = knn_cosine_distance(tokens.reshape(b * n, d), reference["patches"], self.opts.k_neighbors,
                                   self.opts.memory_chunk).view(b, n)
        if self.masking_for(class_name):
            keep = foreground_mask(tokens, grid, self.opts.mask_threshold, self.opts.mask_morphology)
            dist = torch.where(keep, dist, torch.zeros((), dtype=dist.dtype, device=dist.device))
        return dist.view(b, *grid)

    def score_batch(self, x, class_name, reference):
        """-> (scores [B], patch-distance maps [B, gh, gw]); :meth:`finish_maps` resizes and blurs them."""
        if reference is None:
            raise ClipadError(
                f"method 'anomalydino' is few-shot and has no reference images for class '{class_name}': call "
                "det.set_reference(normal_images) (or with class_name=...) first; CLI: --reference DIR"
            )
        dist = self.patch_distances(x, class_name, reference)
        return top_percent_score(dist.flatten(1), self.opts.top_percent), dist

    def finish_maps(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch maps [B, gh, gw] -> [B, H, W]: bilinear (half-pixel) to ``size``, then the
        Gaussian (``smoothing_sigma``) at that size (quirk 7)."""
        return gaussian_blur(resize_map(maps, size), self.opts.smoothing_sigma)
