"""Make the AnomalyDINO and DINOv2 fidelity fixtures by running the official code.

Official code (never copied into clipad; imported from the paths given):
- AnomalyDINO: github.com/dammsi/AnomalyDINO @ b3435f0 (``src/detection.py:run_anomaly_detection``,
  ``src/backbones.py:DINOv2Wrapper``, ``src/utils.py``);
- DINOv2: github.com/facebookresearch/dinov2 (``dinov2/models/vision_transformer.py``), the code
  ``torch.hub.load('facebookresearch/dinov2', ...)`` runs.

Usage (a Python with torch, torchvision, opencv-python-headless, faiss-cpu, scikit-learn, scipy,
tifffile, tqdm, matplotlib, safetensors)::

    python tools/anomalydino_fixtures.py --anomalydino /work/ext/anomalydino --dinov2 /work/ext/dinov2

What it does:

1. builds small random ``DinoVisionTransformer``s from the dinov2 classes (patch 14, native grid
   16 x 16; a plain one with the hub's ``interpolate_offset=0.1`` and one with 4 registers, offset 0
   and antialias, as the hub's ``_reg`` builders); the plain one's final norm weight is scaled
   so that first-principal-component scores cross the official absolute threshold 10;
2. DINOv2 fixture (``tests/fixtures/dinov2/``): the official ``get_intermediate_layers`` outputs
   (final normed patch tokens and CLS, un-normed block outputs) at several non-square sizes;
3. AnomalyDINO fixture (``tests/fixtures/anomalydino/``): an MVTec-layout folder of generated
   images (PNG, 196 x 230: the smaller edge equals ``--resolution`` 196, so the official PIL resize
   is the identity and the top-left crop to 196 x 224 (grid 14 x 16) applies), then ``run_anomaly_detection``
   (the official function, with ``torch.hub.load`` answering the small model, faiss on the CPU,
   ``torch.cuda.synchronize`` a no-op on this CPU) for 1 and 4 shots, with the agnostic hazelnut
   setting (masking and rotation on) and with both off. NumPy is reseeded (``np.random.seed(0)``)
   before every ``compute_background_mask`` call so that its randomized PCA is reproducible
   (spec quirk 9). Saved: the weights, patch maps (``.npy``), scores, full-resolution maps
   (``.tiff``) of some images, and the official test masks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

OFFICIAL_COMMIT = "b3435f0"
RESOLUTION = 196
IMAGE_HW = (196, 230)
SHAPE = {"width": 32, "depth": 3, "heads": 2, "patch_size": 14, "img_size": 224}


def official_vit(dinov2_root: str, *, registers: int, seed: int, width: int, depth: int, heads: int, img_size: int = 224):
    sys.path.insert(0, dinov2_root)
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    vits = importlib.import_module("dinov2.models.vision_transformer")
    torch.manual_seed(seed)
    model = vits.DinoVisionTransformer(
        img_size=img_size, patch_size=SHAPE["patch_size"], embed_dim=width, depth=depth, num_heads=heads,
        init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=registers,
        interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1,
    )
    with torch.no_grad():  # non-trivial biases, positions and tokens (the official init zeroes some)
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "register_tokens", "pos_embed"):
                p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_images(seed: int) -> dict[str, np.ndarray]:
    """Generated MVTec-like images: a textured bright blob (the object) on a darker textured
    background; the 'crack' image carries a dark stroke across the object."""
    rng = np.random.default_rng(seed)
    h, w = IMAGE_HW
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = {}
    names = [f"train/good/{i:03d}.png" for i in range(4)] + ["test/good/000.png", "test/good/001.png",
                                                            "test/crack/000.png"]
    for name in names:
        low = rng.random((h // 14 + 2, w // 14 + 2, 3))
        tex = np.stack([np.kron(low[..., c], np.ones((14, 14)))[:h, :w] for c in range(3)], -1)
        cy, cx = h / 2 + rng.normal(0, 6), w / 2 + rng.normal(0, 6)
        ry, rx = h * 0.3 * rng.uniform(0.9, 1.1), w * 0.28 * rng.uniform(0.9, 1.1)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img = np.where(inside[..., None], 150 + 80 * tex, 20 + 40 * tex)
        img[..., 0] += np.where(inside, 30, 0)
        if "crack" in name:
            stroke = np.abs((yy - cy) - 0.6 * (xx - cx)) < 3
            img[stroke & inside] = 40
        out[name] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return out


def dinov2_fixture(args, plain) -> None:
    from safetensors.torch import save_file

    out = Path(args.out_dinov2)
    out.mkdir(parents=True, exist_ok=True)
    reg = official_vit(args.dinov2, registers=4, seed=1, width=32, depth=2, heads=2, img_size=70)
    g = torch.Generator().manual_seed(3)
    tensors, meta = {}, {"official": "facebookresearch/dinov2 DinoVisionTransformer.get_intermediate_layers",
                         "anomalydino_commit": OFFICIAL_COMMIT}
    for tag, model in (("plain", plain), ("reg", reg)):
        for k, v in model.state_dict().items():
            tensors[f"{tag}.weights.{k}"] = v.contiguous()
        sizes = ((28, 42), (70, 98), (126, 56)) if tag == "plain" else ((70, 70), (28, 42), (98, 56))
        for h, w in sizes:  # the reg model's native grid is 5 x 5 (70 px): the no-interpolation path
            x = torch.randn(1, 3, h, w, generator=g)
            key = f"{tag}.{h}x{w}"
            tensors[f"{key}.input"] = x
            with torch.inference_mode():
                tok, cls = model.get_intermediate_layers(x, n=1, norm=True, return_class_token=True)[0]
                taps = model.get_intermediate_layers(x, n=list(range(model.n_blocks)), norm=False, return_class_token=True)
            tensors[f"{key}.tokens"] = tok.contiguous()
            tensors[f"{key}.cls"] = cls.contiguous()
            for i, (t, c) in enumerate(taps):
                tensors[f"{key}.tap{i + 1}"] = torch.cat([c[:, None], t], 1).contiguous()
    meta["shapes"] = json.dumps({"plain": {**SHAPE, "registers": 0, "interpolate_offset": 0.1, "interpolate_antialias": False},
                                 "reg": {**SHAPE, "width": 32, "depth": 2, "heads": 2, "img_size": 70, "registers": 4,
                                         "interpolate_offset": 0.0, "interpolate_antialias": True}})
    save_file(tensors, str(out / "dinov2.safetensors"), metadata=meta)
    print("wrote", out / "dinov2.safetensors", (out / "dinov2.safetensors").stat().st_size, "bytes")


def anomalydino_fixture(args, plain) -> None:
    import cv2
    import tifffile
    from PIL import Image
    from safetensors.torch import save_file

    sys.path.insert(0, args.anomalydino)
    torch.cuda.synchronize = lambda *a, **k: None  # the official loop times itself with CUDA syncs
    torch.hub.load = lambda *a, **k: plain  # DINOv2Wrapper.load_model answers the small model
    backbones = importlib.import_module("src.backbones")
    detection = importlib.import_module("src.detection")
    utils = importlib.import_module("src.utils")

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images = make_images(0)
    for name, img in images.items():
        Image.fromarray(img).save(out / "images" / name.replace("/", "_"))  # lossless: same pixels for clipad

    _, object_anomalies, masking_default, rotation_default = utils.get_dataset_info("MVTec", "agnostic")
    assert masking_default["hazelnut"] and rotation_default["hazelnut"]
    model = backbones.get_model("dinov2_vits14", "cpu", smaller_edge_size=RESOLUTION)
    records: list[dict] = []
    original_mask = model.compute_background_mask

    def reseeded_mask(feats, grid, threshold=10, masking_type=False, **kw):
        np.random.seed(0)  # spec quirk 9: the randomized PCA draws from NumPy's global RNG
        m = original_mask(feats, grid, threshold=threshold, masking_type=masking_type, **kw)
        if masking_type:
            from sklearn.decomposition import PCA

            np.random.seed(0)
            pc = PCA(n_components=1, svd_solver="randomized").fit_transform(feats.astype(np.float32))[:, 0]
            records.append({"mask": m.copy(), "margin": float(np.min(np.abs(np.abs(pc) - threshold)))})
        return m

    model.compute_background_mask = reseeded_mask

    tensors: dict[str, torch.Tensor] = {k: v.contiguous() for k, v in plain.state_dict().items()}
    meta = {"official_commit": OFFICIAL_COMMIT, "resolution": str(RESOLUTION), "shape": json.dumps(SHAPE),
            "test_images": json.dumps(["test_crack_000.png", "test_good_000.png", "test_good_001.png"])}
    margins = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        for name, img in images.items():
            path = root / "hazelnut" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        for setting, masking, rotation in (("on", True, True), ("off", False, False)):
            for shots in (1, 4):
                records.clear()
                plots = Path(tmp) / f"plots_{setting}_{shots}"
                scores, _, _ = detection.run_anomaly_detection(
                    model, "hazelnut", str(root), shots, {"hazelnut": ["crack"]}, str(plots), save_examples=False,
                    masking=masking, mask_ref_images=False, rotation=rotation, knn_metric="L2_normalized",
                    knn_neighbors=1, faiss_on_cpu=True, seed=0, save_patch_dists=True, save_tiffs=True)
                key = f"{setting}.{shots}shot"
                for i, test in enumerate(("crack/000", "good/000", "good/001")):
                    base = plots / "anomaly_maps" / "seed=0" / "hazelnut" / "test" / test
                    tensors[f"{key}.patch_map.{i}"] = torch.from_numpy(np.load(f"{base}.npy")).contiguous()
                    tensors[f"{key}.score.{i}"] = torch.tensor(float(scores[f"{test.split('/')[0]}/{test.split('/')[1]}.png"]),
                                                               dtype=torch.float64)
                    if i == 0 and (setting, shots) in (("on", 1), ("off", 4)):
                        tensors[f"{key}.full_map.{i}"] = torch.from_numpy(tifffile.imread(f"{base}.tiff").astype(np.float32))
    # the official masks of the test images (the loop visits types in list(set(...)) order, so
    # they are recomputed here in a known order, with the same reseeded official function)
    for i, name in enumerate(("test/crack/000.png", "test/good/000.png", "test/good/001.png")):
        x, grid = model.prepare_image(images[name])
        feats = model.extract_features(x)
        tensors[f"mask.{i}"] = torch.from_numpy(reseeded_mask(feats, grid, threshold=10, masking_type=True))
        margins.append(records[-1]["margin"])
    meta["min_threshold_margin"] = f"{min(margins):.4f}"
    # a small cv2 rotation check: the official rotate_image on a 20 x 24 noise image
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    tensors["rotation.input"] = torch.from_numpy(small)
    for angle in (0, 45, 90, 135, 180, 225, 270, 315):
        tensors[f"rotation.{angle}"] = torch.from_numpy(utils.rotate_image(small, angle))
    save_file(tensors, str(out / "expected.safetensors"), metadata=meta)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print("wrote", out, size, "bytes; min |first_pc| margin to the threshold", meta["min_threshold_margin"],
          "; kept patches per masked test image", [int(tensors[f'mask.{i}'].sum()) for i in range(3)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anomalydino", required=True, help="work tree of dammsi/AnomalyDINO @ b3435f0")
    p.add_argument("--dinov2", required=True, help="work tree of facebookresearch/dinov2")
    here = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
    p.add_argument("--out", default=str(here / "anomalydino"))
    p.add_argument("--out-dinov2", default=str(here / "dinov2"))
    args = p.parse_args()
    plain = official_vit(args.dinov2, registers=0, seed=0, width=SHAPE["width"], depth=SHAPE["depth"], heads=SHAPE["heads"])
    with torch.no_grad():  # first-PC scores must cross the official absolute threshold 10
        plain.norm.weight.copy_(4.0 + torch.rand_like(plain.norm.weight) * 2.0)
    torch.set_num_threads(1)
    dinov2_fixture(args, plain)
    anomalydino_fixture(args, plain)


if __name__ == "__main__":
    main()
