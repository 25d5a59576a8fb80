"""Build the AnoCLIP fidelity fixtures from the official code (not run by CI).

Runs the official AnoVL scripts (``vl_test.py`` = MVTec AD setting, ``vis_test.py`` = VisA
setting) unmodified on a tiny random CLIP and on small synthetic datasets, and stores what they
compute (tensors only, safetensors) under ``tests/fixtures/anoclip/``:

- ``model.safetensors``: the random model's weights (token-embedding rows limited to the tokens
  the prompts use; every other row is zero and cannot influence any output), its config in the
  metadata;
- ``expected.safetensors``: inputs (uint8 images) and the official outputs: CLS embeddings and
  V-V local tokens (``encode_image``), prompt embeddings (``encode_text_with_prompt_ensemble``),
  and from whole script runs the image scores (22-view augmentation) and the anomaly maps without
  and with test-time adaptation, plus the torch RNG state at the first test image of each run.

How the scripts' results are read without editing them: ``roc_auc_score`` in each script's
namespace is replaced by a recorder (the scripts pass it every class's stacked maps and scores),
and the RNG state is recorded when the first image reaches ``aug`` / ``image_tiling``.

Usage (a throwaway venv with the official code's dependencies; see tools/README.md)::

    /tmp/anovl-venv/bin/python tools/anoclip_fixtures.py --official /tmp/anovl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from fixture_io import perturbed_state, write_fixtures, write_test_pair

OFFICIAL_COMMIT = "3a70bfdaea6baf1eeb140c5de8155b535bd94833"
MODEL_NAME = "clipad-anoclip-fixture"
# 14 blocks: the official surgery converts the last 12 (blocks 3..14), so the fixture also covers
# the single-path blocks before the dual path; features [3, 6, 9, 12] are all dual-path blocks.
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 14, "width": 48, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 3},
}
FEATURES = [3, 6, 9, 12]
SIZE = 240
VISA_WIDTH = 320
PROMPT_CLASSES = ["bottle", "carpet", "macaroni1", "metal_nut", "candle"]
MVTEC_CLASSES = ["bottle", "carpet"]  # an object and a texture; two test images each
VISA_CLASS = "candle"
# The official scripts' seeds (test_zero_shot.sh): MVTec AD 111, VisA 42.
MVTEC_SEED, VISA_SEED = 111, 42
MAP_STRIDE = 3  # maps are stored at every 3rd pixel (bilinear upsamples of a 15x15 grid) to stay small


def synthetic_image(rng: np.random.Generator, height: int, width: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random colour field with fine noise (uint8 [H, W, 3]) and its defect mask (uint8 [H, W])."""
    coarse = torch.from_numpy(rng.random((1, 3, 6, 8))).float()
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    img = field.permute(1, 2, 0).numpy() * 0.8 + rng.random((height, width, 3)) * 0.2
    mask = np.zeros((height, width), np.uint8)
    if defect:
        y, x = rng.integers(20, height - 60), rng.integers(20, width - 60)
        img[y : y + 40, x : x + 30] = rng.random(3)
        mask[y : y + 40, x : x + 30] = 255
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def write_dataset(root: Path, classes: list[str], height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Two test images per class (good, then defective) in the meta.json layout; -> uint8 [N, 3, H, W]."""
    meta: dict = {"train": {}, "test": {}}
    images = []
    for cls in classes:
        entries, imgs, _, _ = write_test_pair(root, cls, lambda defect: synthetic_image(rng, height, width, defect))
        images += imgs
        meta["test"][cls] = entries
        meta["train"][cls] = []
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return np.stack(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--official", type=Path, required=True, help=f"checkout of hq-deng/AnoVL at {OFFICIAL_COMMIT[:7]}"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/anoclip")
    parser.add_argument("--seed", type=int, default=7, help="seed of the random weights and images")
    args = parser.parse_args()

    sys.path.insert(0, str(args.official.resolve()))  # the bundled open_clip fork must shadow any other
    import open_clip
    import prompt_ensemble
    import vis_test
    import vl_test

    assert Path(open_clip.__file__).resolve().is_relative_to(args.official.resolve()), open_clip.__file__
    work = Path(tempfile.mkdtemp(prefix="anoclip-fixtures-"))
    cfg_path = work / f"{MODEL_NAME}.json"
    cfg_path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(cfg_path)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    # which token ids the prompts of every fixture class use
    pe = prompt_ensemble
    templates = pe.inds_temp + pe.img_temp + pe.mnf_temp + pe.text_temp + pe.surf_temp
    states = pe.state_normal + pe.state_anomaly
    names = [pe.class_mapping.get(c, c) for c in PROMPT_CLASSES]
    sentences = [t.format(s.format(n)) for n in names for t in templates for s in states]
    used = torch.unique(tokenizer(sentences))
    torch.manual_seed(args.seed)
    weights = perturbed_state(open_clip.create_model(MODEL_NAME, SIZE, pretrained=None), args.seed, used)
    ckpt = work / "weights.pt"
    torch.save(weights, ckpt)

    rng = np.random.default_rng(args.seed)
    mvtec_root, visa_root = work / "mvtec", work / "visa"
    mvtec_images = write_dataset(mvtec_root, MVTEC_CLASSES, SIZE, SIZE, rng)
    visa_images = write_dataset(visa_root, [VISA_CLASS], SIZE, VISA_WIDTH, rng)

    expected: dict[str, torch.Tensor] = {
        "mvtec_images": torch.from_numpy(mvtec_images),
        "visa_images": torch.from_numpy(visa_images),
    }

    # -- encoder outputs and prompt embeddings, straight from the official functions ------------
    model = open_clip.create_model(MODEL_NAME, SIZE, pretrained=str(ckpt))
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    x = (torch.from_numpy(mvtec_images).float() / 255 - mean) / std
    with torch.no_grad():
        pooled, toks = model.encode_image(x, FEATURES)
        # the pipeline reads the aliased list entry 6 through ln_post @ proj: the same tokens
        used6 = model.visual.ln_post(toks[6][:, 1:]) @ model.visual.proj
        assert torch.allclose(used6, pooled[:, 1:], atol=1e-6)
        text, text_rows = prompt_ensemble.encode_text_with_prompt_ensemble(model, PROMPT_CLASSES, tokenizer, "cpu")
    expected["cls"] = pooled[:, 0].contiguous()
    expected["vv_tokens"] = pooled[:, 1:].contiguous()
    for cls in PROMPT_CLASSES:
        expected[f"text/{cls}"] = text[cls].T.contiguous()  # [2, D] (normal, abnormal)
    expected["text_rows/bottle"] = torch.cat([text_rows["bottle"][..., 0], text_rows["bottle"][..., 1]]).contiguous()

    # -- whole script runs ----------------------------------------------------------------------
    def run(module, entry_name: str, root: Path, dataset: str, seed: int, adapter: bool) -> tuple[list, torch.Tensor]:
        calls: list = []
        state: dict = {}

        def record(y_true, y_score):
            calls.append(np.asarray(y_score).copy())
            return 0.5

        original_entry = getattr(module, entry_name)

        def first_image_hook(*a, **k):
            state.setdefault("rng", torch.get_rng_state().clone())
            return original_entry(*a, **k)

        module.roc_auc_score = record
        setattr(module, entry_name, first_image_hook)
        ns = argparse.Namespace(
            data_path=str(root), save_path=str(work / f"out-{dataset}-{adapter}"), config_path=str(cfg_path),
            dataset=dataset, model=MODEL_NAME, pretrained=str(ckpt), features_list=FEATURES,
            few_shot_features=FEATURES, image_size=SIZE, mode="zero_shot", adapter=adapter, epoch=5 if adapter else 0,
            k_shot=0, seed=seed,
        )
        try:
            module.setup_seed(seed)
            module.test(ns)
        finally:
            setattr(module, entry_name, original_entry)
        return calls, state["rng"]

    def maps_and_scores(calls: list, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        maps = [torch.from_numpy(c).float().view(-1, height, width) for c in calls[0::2]]
        scores = [torch.from_numpy(c).float() for c in calls[1::2]]
        return torch.cat(maps), torch.cat(scores)

    for adapter in (False, True):
        calls, rng_state = run(vl_test, "aug", mvtec_root, "mvtec", MVTEC_SEED, adapter)
        maps, scores = maps_and_scores(calls, SIZE, SIZE)
        tag = "tta" if adapter else "plain"
        expected[f"mvtec/{tag}/scores"] = scores
        expected[f"mvtec/{tag}/maps"] = maps[:, ::MAP_STRIDE, ::MAP_STRIDE].contiguous()
        if not adapter:
            expected["mvtec/plain/map0_full"] = maps[0].contiguous()
        else:
            expected["mvtec/tta/rng_state"] = rng_state

        calls, rng_state = run(vis_test, "image_tiling", visa_root, "visa", VISA_SEED, adapter)
        maps, scores = maps_and_scores(calls, SIZE, VISA_WIDTH)
        expected[f"visa/{tag}/scores"] = scores
        expected[f"visa/{tag}/maps"] = maps[:, ::MAP_STRIDE, ::MAP_STRIDE].contiguous()
        if adapter:
            expected["visa/tta/rng_state"] = rng_state

    meta = {
        "config": json.dumps(CONFIG),
        "official_commit": OFFICIAL_COMMIT,
        "seed": str(args.seed),
        "map_stride": str(MAP_STRIDE),
        "mvtec_classes": json.dumps(MVTEC_CLASSES),
        "visa_class": VISA_CLASS,
        "prompt_classes": json.dumps(PROMPT_CLASSES),
        "torch": torch.__version__,
    }
    write_fixtures(args.out, weights, expected, meta, used, OFFICIAL_COMMIT)


if __name__ == "__main__":
    main()
