"""Build the AdaCLIP fidelity fixtures from the official code (not run by CI).

Runs the official AdaCLIP model and trainer (caoyunkang/AdaCLIP @ e27ee32, ``method/adaclip.py``
and ``method/trainer.py``, unmodified) on a small random CLIP built by the official vendored
``method/clip_model.py`` and stores what they compute (tensors only, safetensors) under
``tests/fixtures/adaclip/``:

- ``model.safetensors``: the random CLIP in the OpenAI state-dict layout at its native 56 px
  (float16 values; the official run used exactly these values in float32), token-embedding rows
  limited to the tokens the prompt sentences use; its shape in the header;
- ``expected.safetensors``: the images (uint8), masks and labels; the official trainer's
  checkpoint (``AdaCLIP_Trainer.save``, the released-checkpoint layout) under
  ``official/<key>``; the official token ids of the sentences of each class; per image the
  map before and after ``gaussian_filter(sigma=4)`` (as ``AdaCLIP_Trainer.evaluation``), the image
  score and the HSF k-means labels; one ``train_one_batch`` step on the defective ``metal_nut``
  image: the loss, its focal / Dice terms in call order and the updated checkpoint tensors
  (``train/<key>``).

The model: 8 vision blocks (width 48, 2 heads, patch 14, native 56 px = 4 x 4 grid, run at 168 px
= 12 x 12, so the official load-time plain-bicubic resize of the positional table is exercised and
the fusion's top-100 selection is a real subset of the 144 patches); 5 text blocks (width 32 = the
joint dimension, as the official code requires, 2 heads); prompting depth 4, length 5 (``test.py``),
HSF with 20 clusters; exact GELU (the official ``create_model`` path).

How the official code runs unmodified: ``create_model_and_transforms`` (which would download
OpenAI's ViT-L) is replaced by one returning this random CLIP, built as the official
``create_model`` builds it (``CLIP(**cfg)`` at the run size, ``resize_pos_embed`` of the state
dict, strict load); the HSF's ``KMeans(n_init="auto")`` gets ``random_state=0`` (clipad's
``kmeans_seed`` default; the official None draws from numpy's global state) and records its
labels; ``pkg_resources`` (gone from current setuptools) is given ``packaging``; the loss modules
record their values; during the training step ``x /= y`` is computed out of place (same values),
because the official in-place divisions break float32 backward (see the comment there).

Usage (the official code's dependencies in a venv outside the repo)::

    git --git-dir=/work/.mirror/caoyunkang+AdaCLIP/repo archive e27ee32 | tar -x -C /work/ext/adaclip
    /work/ext/venv/bin/python tools/adaclip_fixtures.py --official /work/ext/adaclip
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import fixture_io
from fixture_io import perturbed_state, write_fixtures

OFFICIAL_COMMIT = "e27ee32bf19be149795c8c8972d4c3c88cd5a496"
SIZE = 168  # 12 x 12 patches; the native grid is 4 x 4
SHAPE = {  # OpenAI-style description (read by the test's loader)
    "embed_dim": 32, "image_resolution": 56, "vision_layers": 8, "vision_width": 48, "vision_head_width": 24,
    "vision_patch_size": 14, "context_length": 77, "vocab_size": 49408, "transformer_width": 32, "transformer_heads": 2,
    "transformer_layers": 5,
}
DESIGN = {"prompting_depth": 4, "prompting_length": 5, "k_clusters": 20, "feat_list": [2, 4, 6, 8]}
# (class, defective) per image; "pill-box" exercises the '-' -> ' ' rule, "metal_nut" the kept '_'
IMAGES = [("metal_nut", False), ("metal_nut", True), ("pill-box", True)]
TRAIN_IMAGE = 1


def model_cfg(image_size: int) -> dict:
    return {
        "embed_dim": SHAPE["embed_dim"],
        "vision_cfg": {"image_size": image_size, "layers": SHAPE["vision_layers"], "width": SHAPE["vision_width"],
                       "head_width": SHAPE["vision_head_width"], "patch_size": SHAPE["vision_patch_size"]},
        "text_cfg": {"context_length": SHAPE["context_length"], "vocab_size": SHAPE["vocab_size"],
                     "width": SHAPE["transformer_width"], "heads": SHAPE["transformer_heads"],
                     "layers": SHAPE["transformer_layers"]},
    }


def synthetic_image(rng: np.random.Generator, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """This fixture's test image and defect mask (:func:`fixture_io.synthetic_image`)."""
    return fixture_io.synthetic_image(rng, SIZE, defect, coarse=5, box=(40, 30), margin=(10, 50), mask_value=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help=f"work tree of caoyunkang/AdaCLIP at {OFFICIAL_COMMIT[:7]}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/adaclip")
    parser.add_argument("--seed", type=int, default=7, help="seed of the random weights and images")
    args = parser.parse_args()

    import packaging.version

    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=packaging))
    # the official tools/__init__ imports tensorboard and seaborn for logging and plots only
    sys.modules.setdefault("torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=None))
    try:
        import seaborn  # noqa: F401  (plots only)
    except ImportError:
        sys.modules["seaborn"] = types.SimpleNamespace()
    sys.path.insert(0, str(args.official.resolve()))
    import torchvision.transforms as T
    from method import adaclip as official
    from method import trainer as official_trainer
    from method.clip_model import CLIP, resize_pos_embed
    from sklearn.cluster import KMeans

    # -- the random CLIP (GELU, fp16-exact values), at its native size -------------------------------
    texts = [s for cls in sorted({c for c, _ in IMAGES}) for s in _sentences(official, cls)]
    layer = official.TextEmbebddingLayer(fixed=False)
    used = torch.unique(layer.tokenize(texts).long())
    torch.manual_seed(args.seed)
    native = CLIP(**model_cfg(SHAPE["image_resolution"]))
    weights = perturbed_state(native, args.seed, used, round_half=True)

    def create_model_and_transforms(backbone, image_size, pretrained=None, **_):
        """What the official create_model does with OpenAI weights, on the random ones."""
        model = CLIP(**model_cfg(image_size))
        sd = copy.deepcopy(weights)
        resize_pos_embed(sd, model)
        model.load_state_dict(sd, strict=True)
        return model, None, T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])

    official_trainer.create_model_and_transforms = create_model_and_transforms
    torch.manual_seed(args.seed + 2)  # the official init of the prompts and projections
    trainer = official_trainer.AdaCLIP_Trainer(
        backbone="random", feat_list=DESIGN["feat_list"], input_dim=SHAPE["vision_width"], output_dim=SHAPE["embed_dim"],
        learning_rate=0.01, device="cpu", image_size=SIZE, prompting_depth=DESIGN["prompting_depth"],
        prompting_length=DESIGN["prompting_length"], prompting_branch="VL", prompting_type="SD", use_hsf=True,
        k_clusters=DESIGN["k_clusters"],
    )
    model = trainer.clip_model
    # static prompts drawn larger than the N(0, 0.02) init, so that their effect is far above float noise
    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed + 3)
        for prompter in (model.text_prompter, model.visual_prompter):
            for p in prompter.static_prompts:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    labels_seen: list[np.ndarray] = []

    class RecordingKMeans(KMeans):
        def fit_predict(self, X, y=None, sample_weight=None):  # noqa: N803 - sklearn's names
            out = super().fit_predict(X, y, sample_weight)
            labels_seen.append(np.asarray(out).copy())
            return out

    model.HSF.cluster_performer = RecordingKMeans(n_clusters=DESIGN["k_clusters"], n_init="auto", random_state=0)

    work = args.out / "_tmp"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "official.pth"
    trainer.save(str(ckpt))
    official_state = torch.load(ckpt, weights_only=True)
    ckpt.unlink()
    work.rmdir()

    rng = np.random.default_rng(args.seed)
    images, masks = zip(*(synthetic_image(rng, d) for _, d in IMAGES))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - mean) / std

    expected: dict[str, torch.Tensor] = {
        "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        "masks": torch.from_numpy(np.stack(masks)),  # uint8 {0, 1}
        "labels": torch.tensor([int(d) for _, d in IMAGES]),
        **{f"official/{k}": v.float().contiguous() for k, v in official_state.items()},
    }
    for cls in sorted({c for c, _ in IMAGES}):
        expected[f"tokens/{cls}"] = layer.tokenize(_sentences(official, cls)).long()

    # -- evaluation, one image at a time (the official code supports batch 1 only) -----------------
    from scipy.ndimage import gaussian_filter

    model.eval()
    with torch.no_grad():
        for i, (cls, _) in enumerate(IMAGES):
            before = len(labels_seen)
            amap, score = model(x[i : i + 1], [cls], aggregation=True)
            assert len(labels_seen) == before + 1
            raw = amap.cpu().numpy()[0]
            expected[f"eval/{i}/map_raw"] = torch.from_numpy(raw).float()
            expected[f"eval/{i}/map"] = torch.from_numpy(gaussian_filter(raw, sigma=4)).float()
            expected[f"eval/{i}/score"] = score.float().reshape(1)
            expected[f"eval/{i}/kmeans_labels"] = torch.from_numpy(labels_seen[-1]).long()

    # -- one training step (official train_one_batch) ---------------------------------------------
    terms: list[torch.Tensor] = []
    focal_cls, dice_cls = type(trainer.loss_focal), type(trainer.loss_dice)

    class Focal(focal_cls):
        def forward(self, logit, target):
            v = super().forward(logit, target)
            terms.append(v.detach().clone())
            return v

    class Dice(dice_cls):
        def forward(self, input, targets):  # noqa: A002 - the official signature
            v = super().forward(input, targets)
            terms.append(v.detach().clone())
            return v

    trainer.loss_focal, trainer.loss_dice = Focal(), Dice()
    model.train()
    i = TRAIN_IMAGE
    items = {"img": x[i : i + 1].clone(), "cls_name": [IMAGES[i][0]],
             "img_mask": torch.from_numpy(masks[i]).float()[None, None].clone(), "anomaly": torch.tensor([int(IMAGES[i][1])])}
    before = len(labels_seen)
    # In float32 the official step fails in backward ("modified by an inplace operation"): it divides
    # by norms in place (``x /= x.norm(...)``) on tensors autograd still needs; under the released
    # CUDA fp16 autocast ``norm`` works on a float32 copy, which hides it. Out-of-place division
    # computes the same values.
    itruediv = torch.Tensor.__itruediv__
    torch.Tensor.__itruediv__ = lambda self, other: self / other
    try:
        loss = trainer.train_one_batch(items)
    finally:
        torch.Tensor.__itruediv__ = itruediv
    expected["train/loss"] = loss.detach().float().reshape(1)
    expected["train/terms"] = torch.stack(terms).float()  # image focal, then per tap: focal, dice(abn), dice(normal)
    expected["train/kmeans_labels"] = torch.from_numpy(labels_seen[before]).long()
    updated = {k: v for k, v in trainer.state_dict().items() if k in official_state}
    for k in official_state:
        expected[f"train/{k}"] = updated[k].detach().float().contiguous()

    meta = {"shape": json.dumps(SHAPE), "design": json.dumps(DESIGN), "images": json.dumps(IMAGES), "image_size": str(SIZE),
            "official_commit": OFFICIAL_COMMIT, "seed": str(args.seed), "kmeans_random_state": "0", "torch": torch.__version__}
    write_fixtures(args.out, weights, expected, meta, used, OFFICIAL_COMMIT, dtype=torch.float16)


def _sentences(official, cls: str) -> list[str]:
    """The official sentences of a class, in the official order (read from its text layer)."""
    layer = official.TextEmbebddingLayer(fixed=False)
    name = cls.replace("-", " ")
    return [t.format(s.format(name)) for states in layer.prompt_state for s in states for t in layer.prompt_templates]


if __name__ == "__main__":
    main()
