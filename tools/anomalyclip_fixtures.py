"""Build the AnomalyCLIP fidelity fixtures from the official code (not run by CI).

Runs the official AnomalyCLIP scripts' entry points, ``test.test(args)`` and
``train.train(args)`` (zqhang/AnomalyCLIP @ 45ed4dd), unmodified, on a small random CLIP in the
OpenAI state-dict format and on a four-image synthetic dataset in the official ``meta.json``
layout, and stores what they compute (tensors only, safetensors) under
``tests/fixtures/anomalyclip/``:

- ``model.safetensors``: the random CLIP (float16 values; the official run used exactly these
  values in float32), token-embedding rows limited to the tokens the two prompts use (every other
  row is zero and cannot influence any output); its shape in the header;
- ``expected.safetensors``: the images and masks, the random prompt-learner weights under their
  official names (``official/ctx_pos``, ``official/ctx_neg``, ``official/compound_prompts_text.<i>``),
  the official tokenised prompts and prompt embeddings, and for two settings

  * ``last``: the scripts' setting (``--features_list 24``): DPAM from block 1 of 4, tap 4;
  * ``multi``: the argparse default (``--features_list 6 12 18 24``): DPAM from block 2 of 4,
    taps 1..4 (tap 1 before the dual path);

  the image scores and Gaussian-smoothed maps of ``test.py`` and one ``train.py`` step (batch of
  all four images): the loss, its focal / Dice / cross-entropy terms and the updated weights.

The model has 4 vision blocks (width 64, patch 14, 56 px native, run at 98 px so the positional
embedding is interpolated) and 5 text layers (width 64) with deep prompts of depth 4 (layers
2..4 replaced, layer 5 not), 12 context vectors and 4 deep vectors per layer. The official
builder fixes one attention head per 64 channels, so both towers have one head.

How the scripts run without edits: ``AnomalyCLIP_lib.load`` builds the model from the random
state dict with the official ``build_model`` (its own file reading fails on a plain state dict
under current torch: the TorchScript attempt leaves the file position past the start),
``DAPM_replace`` gets this model's layer count instead of the hard-coded 20, the dataset's class
list is this dataset's, the metric functions of ``test.py`` are replaced by a recorder of the
``results`` dict they receive (maps after the Gaussian, image scores), ``Tensor.cuda`` is the
identity on this CPU run, the prompt learner is built by the official class and then given the
fixture's random weights, and ``Tensor.backward`` / the loss modules record what they see.

Usage (a throwaway venv with the official code's dependencies; see tools/README.md)::

    /tmp/anomalyclip-venv/bin/python tools/anomalyclip_fixtures.py --official /tmp/anomalyclip
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import fixture_io
from fixture_io import perturbed_state, write_fixtures, write_test_pair

OFFICIAL_COMMIT = "45ed4dd35c05797d854294b5e8d585c545920089"
SIZE = 98  # 7 x 7 patches; the native grid is 4 x 4
SHAPE = {  # the official builder's arguments (heads = width // 64)
    "embed_dim": 32, "image_resolution": 56, "vision_layers": 4, "vision_width": 64, "vision_patch_size": 14,
    "context_length": 77, "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 5,
}
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 4, "learnabel_text_embedding_length": 4}
# name -> (official DPAM_layer: the last DPAM_layer - 1 blocks are dual-path, features_list)
SETTINGS = {"last": (5, [4]), "multi": (4, [1, 2, 3, 4])}
CLASSES = ["bottle", "carpet"]


def synthetic_image(rng: np.random.Generator, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """This fixture's test image and defect mask (:func:`fixture_io.synthetic_image`)."""
    return fixture_io.synthetic_image(rng, SIZE, defect, coarse=5, box=(28, 20), margin=(10, 40), mask_value=255)


def write_dataset(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class a good then a defective test image, meta.json layout -> (images, masks, labels)."""
    meta: dict = {"train": {}, "test": {}}
    images, masks, labels = [], [], []
    for cls in CLASSES:
        entries, imgs, msks, lbls = write_test_pair(root, cls, lambda defect: synthetic_image(rng, defect))
        images += imgs
        masks += msks
        labels += lbls
        meta["test"][cls] = entries
        meta["train"][cls] = []
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return np.stack(images), np.stack(masks), np.asarray(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help=f"checkout of zqhang/AnomalyCLIP at {OFFICIAL_COMMIT[:7]}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/anomalyclip")
    parser.add_argument("--seed", type=int, default=5, help="seed of the random weights and images")
    args = parser.parse_args()

    sys.path.insert(0, str(args.official.resolve()))
    try:
        import thop  # noqa: F401  (imported, never used, by the official model file)
    except ImportError:
        sys.modules["thop"] = types.SimpleNamespace(profile=None)
    import AnomalyCLIP_lib
    import dataset as official_dataset
    import prompt_ensemble
    import test as official_test
    import train as official_train
    from AnomalyCLIP_lib.AnomalyCLIP import AnomalyCLIP, VisionTransformer
    from AnomalyCLIP_lib.build_model import build_model

    work = Path(tempfile.mkdtemp(prefix="anomalyclip-fixtures-"))
    n_ctx = DESIGN["Prompt_length"]
    texts = [" ".join(["X"] * n_ctx) + " object.", " ".join(["X"] * n_ctx) + " damaged object."]
    used = torch.unique(prompt_ensemble.tokenize(texts).long())
    torch.manual_seed(args.seed)
    weights = perturbed_state(AnomalyCLIP(**SHAPE, design_details=DESIGN), args.seed, used, round_half=True)
    weights_file = work / "clip.pt"
    extra = {"input_resolution": torch.tensor(SHAPE["image_resolution"]), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(SHAPE["vocab_size"])}
    torch.save({**weights, **extra}, weights_file)

    rng = np.random.default_rng(args.seed)
    root = work / "data"
    images, masks, labels = write_dataset(root, rng)

    # -- the random prompt-learner weights, in the official module ------------------------------
    g = torch.Generator().manual_seed(args.seed + 2)
    n_deep = DESIGN["learnabel_text_embedding_depth"] - 1
    width = SHAPE["transformer_width"]
    init = {
        "ctx_pos": 0.05 * torch.randn(1, 1, n_ctx, width, generator=g),
        "ctx_neg": 0.05 * torch.randn(1, 1, n_ctx, width, generator=g),
        **{f"compound_prompts_text.{i}": 0.05 * torch.randn(DESIGN["learnabel_text_embedding_length"], width, generator=g)
           for i in range(n_deep)},
    }

    original_load = AnomalyCLIP_lib.load
    original_replace = VisionTransformer.DAPM_replace
    original_cuda = torch.Tensor.cuda
    original_backward = torch.Tensor.backward
    dpam = {"layer": None}

    def load(name, device="cpu", design_details=None, **_):
        # what the official load() does with a state-dict file after its TorchScript attempt
        # (which, on current torch, leaves the file position past the start)
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        return build_model(name, state, design_details).float(), None

    def replace(self, DPAM_layer):  # noqa: N803 - the official keyword
        return original_replace(self, dpam["layer"])

    base_learner = official_train.AnomalyCLIP_PromptLearner

    class SeededLearner(base_learner):
        def __init__(self, clip_model, design_details):
            super().__init__(clip_model, design_details)
            self.load_state_dict({**self.state_dict(), **init})

    AnomalyCLIP_lib.load = load
    VisionTransformer.DAPM_replace = replace
    official_dataset.generate_class_info = lambda name: (list(CLASSES), {c: i for i, c in enumerate(CLASSES)})
    official_train.AnomalyCLIP_PromptLearner = SeededLearner
    official_test.AnomalyCLIP_PromptLearner = SeededLearner

    expected: dict[str, torch.Tensor] = {
        "images": torch.from_numpy(images), "masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels),
        **{f"official/{k}": v.contiguous() for k, v in init.items()},
    }

    # prompt embeddings of the initial weights, straight from the official functions
    model, _ = AnomalyCLIP_lib.load("ViT-L/14@336px", device="cpu", design_details=DESIGN)
    learner = SeededLearner(model, DESIGN)
    with torch.no_grad():
        prompts, tokenized, deep = learner(cls_id=None)
        text = model.encode_text_learn(prompts, tokenized, deep).float()
    expected["tokenized_prompts"] = tokenized.long().contiguous()
    expected["text_features"] = (text / text.norm(dim=-1, keepdim=True)).contiguous()
    ckpt = work / "prompt_learner.pth"
    torch.save({"prompt_learner": learner.state_dict()}, ckpt)

    def run_test(setting: str, features: list[int]) -> dict:
        """``test.py`` unmodified; its results dict (maps after the Gaussian, image scores)."""
        seen: dict = {}

        def record(results, obj, metric):
            seen.setdefault("results", results)
            return 0.0

        official_test.image_level_metrics = record
        official_test.pixel_level_metrics = record
        ns = argparse.Namespace(
            data_path=str(root), save_path=str(work / f"test-{setting}"), checkpoint_path=str(ckpt), dataset="mvtec",
            features_list=features, image_size=SIZE, depth=DESIGN["learnabel_text_embedding_depth"], n_ctx=n_ctx,
            t_n_ctx=DESIGN["learnabel_text_embedding_length"], feature_map_layer=[0, 1, 2, 3],
            metrics="image-pixel-level", seed=111, sigma=4,
        )
        official_test.setup_seed(111)
        official_test.test(ns)
        return seen["results"]

    def run_train(setting: str, features: list[int]) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
        """``train.py`` unmodified, one step on all four images -> (recorded terms, updated weights)."""
        terms: dict[str, list] = {"focal": [], "dice": [], "ce": [], "backward": []}
        base_focal, base_dice = official_train.FocalLoss, official_train.BinaryDiceLoss
        original_ce = torch.nn.functional.cross_entropy

        class Focal(base_focal):
            def forward(self, logit, target):
                value = super().forward(logit, target)
                terms["focal"].append(value.detach().clone())
                return value

        class Dice(base_dice):
            def forward(self, input, targets):  # noqa: A002 - the official signature
                value = super().forward(input, targets)
                terms["dice"].append(value.detach().clone())
                return value

        def ce(*a, **k):
            value = original_ce(*a, **k)
            terms["ce"].append(value.detach().clone())
            return value

        def backward(self, *a, **k):
            terms["backward"].append(self.detach().clone())
            return original_backward(self, *a, **k)

        official_train.FocalLoss, official_train.BinaryDiceLoss = Focal, Dice
        torch.nn.functional.cross_entropy = ce
        torch.Tensor.backward = backward
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            ns = argparse.Namespace(
                train_data_path=str(root), save_path=str(work / f"train-{setting}"), dataset="mvtec",
                depth=DESIGN["learnabel_text_embedding_depth"], n_ctx=n_ctx, t_n_ctx=DESIGN["learnabel_text_embedding_length"],
                feature_map_layer=[0, 1, 2, 3], features_list=features, epoch=1, learning_rate=0.001, batch_size=len(images),
                image_size=SIZE, print_freq=1, save_freq=1, seed=111,
            )
            official_train.setup_seed(111)
            official_train.train(ns)
        finally:
            official_train.FocalLoss, official_train.BinaryDiceLoss = base_focal, base_dice
            torch.nn.functional.cross_entropy = original_ce
            torch.Tensor.backward = original_backward
            torch.Tensor.cuda = original_cuda
        assert len(terms["backward"]) == 1, "expected exactly one optimisation step"
        updated = torch.load(work / f"train-{setting}" / "epoch_1.pth", weights_only=True)["prompt_learner"]
        return terms, updated

    for setting, (dpam_layer, features) in SETTINGS.items():
        dpam["layer"] = dpam_layer
        res = run_test(setting, features)
        expected[f"{setting}/maps"] = torch.from_numpy(np.concatenate([res[c]["anomaly_maps"] for c in CLASSES])).float()
        expected[f"{setting}/scores"] = torch.stack([torch.stack(list(res[c]["pr_sp"])) for c in CLASSES]).reshape(-1).float()
        terms, updated = run_train(setting, features)
        expected[f"{setting}/train/loss"] = terms["backward"][0].reshape(1)
        expected[f"{setting}/train/focal"] = torch.stack(terms["focal"])
        expected[f"{setting}/train/dice_abnormal"] = torch.stack(terms["dice"][0::2])
        expected[f"{setting}/train/dice_normal"] = torch.stack(terms["dice"][1::2])
        expected[f"{setting}/train/image_ce"] = terms["ce"][0].reshape(1)
        for k in init:
            expected[f"{setting}/train/{k}"] = updated[k].float().contiguous()

    AnomalyCLIP_lib.load, VisionTransformer.DAPM_replace = original_load, original_replace

    meta = {"shape": json.dumps(SHAPE), "design": json.dumps(DESIGN), "settings": json.dumps(SETTINGS), "image_size": str(SIZE),
            "official_commit": OFFICIAL_COMMIT, "seed": str(args.seed), "classes": json.dumps(CLASSES), "torch": torch.__version__}
    write_fixtures(args.out, weights, expected, meta, used, OFFICIAL_COMMIT, dtype=torch.float16)


if __name__ == "__main__":
    main()
