"""Fidelity fixtures of MuSc from the official code (github.com/xrli-U/MuSc, commit
b76b93da8bd3096a99964a96ae29d46f197a0651), for tests/unit/methods/musc/test_musc.py.

The official pipeline runs unmodified (``models.musc.MuSc.make_category_data``: its vendored
open_clip, LNAMD, MSM and RsCIN) on a small random CLIP in the OpenAI state-dict layout and a
generated MVTec-layout class of 10 images; its outputs are read by wrapping ``RsCIN`` and
``compute_metrics`` in ``models.musc``'s namespace (recorders that call the real RsCIN).

The model: a 12-block ViT (the vendored tower collects block 12's attention, so it needs >= 12
blocks), width 64 (the OpenAI loader derives 64-wide heads), patch 8, native 48 px (6 x 6 grid),
run at 64 px (8 x 8 grid): the official loader then rebuilds CLIP from the JSON config (GELU
MLPs, quirk 1) and resizes the positional embedding by plain bicubic (quirk 2). A second run at
the native 48 px keeps OpenAI's QuickGELU and the embedding as it is. Every weight is rounded to
float16 before the official load (which rounds Linear/Conv/attention weights to fp16 anyway), so
the float16 file holds exactly what the official code ran.

A third run takes the official DINOv2 branch (``backbone_name`` containing ``dinov2``, whose
``_backbones.load`` calls ``torch.hub.load('facebookresearch/dinov2', name)``; replaced by a random
official ``DinoVisionTransformer`` of facebookresearch/dinov2 shaped as clipad's ``tiny-dinov2``):
taps through the model's final norm (``get_intermediate_layers(norm=True)``), class tokens = the
normed CLS (not L2-normalised), ImageNet normalisation; at 48 px on the native run's images.

Writes ``tests/fixtures/musc/`` (tensors only, safetensors):

- ``model.safetensors``: the CLIP image tower in the OpenAI layout (``visual.*``, float16; the text
  tower cannot affect any output and is left out) and the DINOv2 (``dinov2.*``, the official
  layout), and in the header the model config (``config``, open_clip JSON) and the official commit;
- ``expected.safetensors``: for each run (``main`` at 64 px, ``native`` at 48 px, ``dinov2`` at
  48 px on the native images): ``images``
  uint8 [N, H, W, 3] in the official dataset order, ``maps`` [N, S, S] float32 (the official
  float64 maps, rounded), ``raw_scores`` float64 (max of each map: RsCIN's input),
  ``class_tokens`` float32, ``scores`` float32 (after RsCIN, k_list [1, 2, 3]); plus
  ``main/scores_visa`` (the official RsCIN with VisA's [1, 8, 9] on the main run's inputs).

Run (the official code needs packages clipad does not; a venv outside the repo)::

    git clone https://github.com/xrli-U/MuSc /tmp/musc && git -C /tmp/musc checkout b76b93d
    pip install torch torchvision opencv-python-headless scikit-learn scikit-image openpyxl \
        tqdm pyyaml ftfy regex safetensors pillow
    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2   # b8931f7 was used
    python tools/musc_fixtures.py --official /tmp/musc --dinov2 /tmp/dinov2 --out tests/fixtures/musc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

OFFICIAL_COMMIT = "b76b93da8bd3096a99964a96ae29d46f197a0651"
ARCH = "musc-fixture"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 48, "layers": 12, "width": 64, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
}
MAIN_SIZE, NATIVE_SIZE = 64, 48
#: clipad's ``tiny-dinov2`` (backbones/configs/dinov2.json) as the official hub builder makes a ViT
DINO_SHAPE = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 16, "img_size": 112}
DINO_NAME = "dinov2_tiny"  # the official code takes the DINOv2 branch for names containing 'dinov2'

FEATURE_LAYERS = [2, 5, 8, 11]  # 0-based, as the yaml: blocks 3/6/9/12 of 12 = depth fractions 1/4..1
N_GOOD, N_DEFECT = 5, 5
SEED = 0


def random_openai_state(official_clip_cls) -> dict[str, torch.Tensor]:
    """A random CLIP (the official class, QuickGELU) with perturbed biases / LayerNorms, every
    value rounded to float16, in the OpenAI key layout."""
    torch.manual_seed(SEED)
    model = official_clip_cls(**CONFIG, quick_gelu=True)
    g = torch.Generator().manual_seed(SEED + 1)
    sd = {}
    for name, p in model.state_dict().items():
        p = p.detach().clone().float()
        if name.endswith("bias") or any(part.startswith("ln_") for part in name.split(".")):
            p += 0.1 * torch.randn(p.shape, generator=g)  # their init 0 / 1 would hide mistakes
        elif name.endswith("in_proj_weight") or name.endswith("out_proj.weight"):
            p += 0.02 * torch.randn(p.shape, generator=g)
        sd[name] = p.half().float()
    # a stronger class embedding / positional embedding, so that the resize matters
    sd["visual.positional_embedding"] = (sd["visual.positional_embedding"] * 4).half().float()
    return sd


def official_dinov2(dinov2_root: Path) -> torch.nn.Module:
    """A random official ``DinoVisionTransformer`` (facebookresearch/dinov2) shaped as clipad's
    ``tiny-dinov2``, with the hub builder's settings (layer scale 1.0, ``interpolate_offset`` 0.1,
    no antialias); biases, LayerNorms, layer scales, CLS and positions perturbed; every value
    rounded to float16."""
    sys.path.insert(0, str(dinov2_root))
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(SEED + 2)
    model = DinoVisionTransformer(**DINO_SHAPE, init_values=1.0, ffn_layer="mlp", block_chunks=0,
                                  num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
    g = torch.Generator().manual_seed(SEED + 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed") or "norm" in name or ".ls" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())
    return model.eval()


def write_class(root: Path, cls: str, size: int, rng: np.random.Generator) -> None:
    """MVTec layout: ``cls/test/good``, ``cls/test/defect`` (+ masks): smooth noise, defects a bright square."""
    for i in range(N_GOOD + N_DEFECT):
        base = (rng.random((size // 8, size // 8, 3)) * 120 + 60).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC)).copy()
        img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        kind = "good" if i < N_GOOD else "defect"
        (root / cls / "test" / kind).mkdir(parents=True, exist_ok=True)
        if kind == "defect":
            y, x = rng.integers(2, size - size // 4 - 2, size=2)
            img[y : y + size // 4, x : x + size // 4] = rng.integers(200, 256, 3)
            mask = np.zeros((size, size), np.uint8)
            mask[y : y + size // 4, x : x + size // 4] = 255
            (root / cls / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / cls / "ground_truth" / kind / f"{i:03d}_mask.png")
        Image.fromarray(img).save(root / cls / "test" / kind / f"{i:03d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="work tree of xrli-U/MuSc at b76b93d")
    ap.add_argument("--dinov2", type=Path, required=True,
                    help="work tree of facebookresearch/dinov2 (what the official torch.hub.load runs)")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/musc"))
    args = ap.parse_args()
    dinov2_root = args.dinov2.resolve()
    out = args.out.resolve()
    official = args.official.resolve()
    os.chdir(official)  # models/musc.py appends './models/backbone' to sys.path
    sys.path.insert(0, str(official))

    import models.backbone.open_clip as oc
    import models.backbone.open_clip.factory as factory
    import models.backbone.open_clip.openai as openai_mod
    import models.musc as musc_mod
    from models.backbone.open_clip.model import CLIP

    dino = official_dinov2(dinov2_root)
    musc_mod._backbones.load = lambda name: dino  # the official torch.hub.load('facebookresearch/dinov2', name)

    tmp = Path(tempfile.mkdtemp(prefix="musc-fixture-"))
    state = random_openai_state(CLIP)
    pt = tmp / "clip.pt"
    torch.save(state, pt)
    # the architecture joins the official registry; 'openai' weights come from our file
    factory._MODEL_CONFIGS[ARCH] = json.loads(json.dumps(CONFIG))
    real_load = openai_mod.load_openai_model
    factory.load_openai_model = lambda name, precision=None, device=None, jit=True, cache_dir=None: real_load(
        str(pt), precision=precision, device=device, jit=False, cache_dir=cache_dir)
    oc.load_openai_model = factory.load_openai_model

    rng = np.random.default_rng(SEED)
    data = tmp / "data"
    write_class(data, "widget", MAIN_SIZE, rng)
    write_class(data, "widget48", NATIVE_SIZE, rng)

    recorded: dict[str, object] = {}
    real_rscin = musc_mod.RsCIN

    def rscin_recorder(scores_old, cls_tokens=None, k_list=(0,)):
        recorded["raw_scores"] = np.array(scores_old, dtype=np.float64)
        recorded["class_tokens"] = np.array(cls_tokens, dtype=np.float32)
        recorded["k_list"] = list(k_list)
        return real_rscin(scores_old, cls_tokens, k_list=k_list)

    def metrics_recorder(gt_sp, pr_sp, gt_px, pr_px):
        recorded["scores"], recorded["maps"] = np.array(pr_sp), np.array(pr_px)
        return (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)

    musc_mod.RsCIN = rscin_recorder
    musc_mod.compute_metrics = metrics_recorder

    expected: dict[str, torch.Tensor] = {}
    runs = (("main", "widget", MAIN_SIZE, ARCH, FEATURE_LAYERS), ("native", "widget48", NATIVE_SIZE, ARCH, FEATURE_LAYERS),
            ("dinov2", "widget48", NATIVE_SIZE, DINO_NAME, [0, 1, 2, 3]))
    for run, cls, size, backbone, layers in runs:
        cfg = {
            "device": "0",
            "datasets": {"data_path": str(data), "dataset_name": "mvtec_ad", "class_name": cls, "img_resize": size,
                         "divide_num": 1},
            "models": {"backbone_name": backbone, "pretrained": "openai", "batch_size": 4,
                       "feature_layers": layers, "r_list": [1, 3, 5]},
            "testing": {"output_dir": str(tmp / "out"), "vis": False, "vis_type": "single_norm", "save_excel": False},
        }
        model = musc_mod.MuSc(cfg, seed=42)
        if backbone == ARCH:
            gelu = type(model.clip_model.visual.transformer.resblocks[0].mlp.gelu).__name__
            print(f"{run}: {size} px, MLP activation {gelu}")
        recorded.clear()
        model.make_category_data(cls)
        paths = [p for t in sorted(os.listdir(data / cls / "test")) for p in sorted((data / cls / "test" / t).glob("*.png"))]
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        if run != "dinov2":  # the DINOv2 run scores the native run's images
            expected[f"{run}/images"] = torch.from_numpy(images)
        else:
            assert np.array_equal(images, expected["native/images"].numpy())
        expected[f"{run}/maps"] = torch.from_numpy(recorded["maps"]).reshape(len(paths), size, size).float()
        expected[f"{run}/raw_scores"] = torch.from_numpy(recorded["raw_scores"])
        expected[f"{run}/class_tokens"] = torch.from_numpy(recorded["class_tokens"])
        expected[f"{run}/scores"] = torch.from_numpy(np.asarray(recorded["scores"], dtype=np.float32))
        if run == "main":
            visa = real_rscin(recorded["raw_scores"], list(recorded["class_tokens"]), k_list=[1, 8, 9])
            expected["main/scores_visa"] = torch.from_numpy(np.asarray(visa, dtype=np.float32))
        print(f"{run}: scores {expected[f'{run}/scores'].numpy().round(4)}")

    meta = {"official_commit": OFFICIAL_COMMIT, "config": json.dumps(CONFIG), "arch": ARCH,
            "feature_layers": json.dumps(FEATURE_LAYERS), "r_list": "[1, 3, 5]", "sizes": json.dumps([MAIN_SIZE, NATIVE_SIZE])}
    out.mkdir(parents=True, exist_ok=True)
    # the image tower only (the text tower cannot affect any output); the DINOv2 under "dinov2."
    weights = {k: v.half() for k, v in state.items() if k.startswith("visual.")}
    weights.update({f"dinov2.{k}": v.half() for k, v in dino.state_dict().items()})
    meta["dinov2_shape"] = json.dumps(DINO_SHAPE)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata=meta)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"), metadata=meta)
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out} ({total / 1e6:.2f} MB); official commit {OFFICIAL_COMMIT}")


if __name__ == "__main__":
    main()
