"""Build the AdaptCLIP fidelity fixtures from the official code (not run by CI).

Runs the official AdaptCLIP scripts' entry points, ``test.test(args)`` (0-, 1- and 2-shot) and
``train.train(args)`` (one step), gaobb/AdaptCLIP @ 354d9e3, on a small random CLIP in the
OpenAI state-dict format and a synthetic dataset in the official ``meta.json`` layout, with the
scripts' flags (all three adapters, ``--pq_context``, fusion ``average_mean``, sigma 4), and
stores what they compute (tensors only, safetensors) under ``tests/fixtures/adaptclip/``:

- ``model.safetensors``: the random CLIP (float16 values; the official run used exactly these
  values in float32), token-embedding rows limited to the tokens the learned and static prompts
  use (every other row is zero and cannot influence any output); its shape in the header;
- ``expected.safetensors``:

  * ``images`` / ``masks`` / ``labels``: the four test images (per class a good and a defective
    one) and ``train_images``: the three normal training images per class (the reference pool);
  * ``official/<learner>/<key>``: the random adapter weights under their official names
    (``textual_learner``, ``visual_learner``, ``pq_learner``; the PQ heads once, as index 0 of
    the official per-layer list, whose entries are one module), BatchNorm statistics included;
  * ``shot<k>/maps``, ``shot<k>/scores`` for k = 0, 1, 2: ``test.py``'s maps after the Gaussian
    and image scores; ``shot<k>/references``: indices into ``train_images`` of the references
    the official sampler drew for each class (seed 10), class-major;
  * ``train/...``: one ``train.py`` step on the four test images in the script's shuffled
    order (``train/order``), with the normal reference each query was given
    (``train/references``, indices into ``train_images``): ``train/loss`` (recorded at
    ``backward``) and the weights after the step (``train/<learner>/<key>``, running statistics
    included).

The model has 4 vision blocks (width 64, patch 14, 56 px native, run at 84 px so the positional
embedding is interpolated, 6 x 6 patches) and 2 text layers (width 64), embedding width 32; DPAM
on the last 2 blocks (``DPAM_layer=3``, i.e. round(4 x 20 / 24)) and taps 1, 2, 3, 4 (6/12/18/24
relative), so tap 2 sits right before the first dual-path block (the in-place aliasing quirk
is exercised). The adapters: 12 context vectors, visual reduction 4, PQ hidden width 32.

Harness patches (no official file is edited): ``adaptcliplib.load`` builds the model from the
random state dict with the official ``build_model``; ``DAPM_replace`` gets this model's
``DPAM_layer`` instead of the hard-coded 20; the scripts' hard-coded ``input_dim=768`` is
replaced by this model's 32 where the adapters are built, and the adapter classes load the
fixture's initial weights after their own construction; ``Tensor.cuda`` is the identity on this
CPU run; ``test.py``'s ``Evaluator`` is replaced by a recorder of the ``results_eval`` it is
handed (maps after the Gaussian, image scores, in dataset order); ``model.encode_image`` and
``Tensor.backward`` record what they see during the training step.

Usage (a throwaway environment with the official code's dependencies; see tools/README.md)::

    PYTHONPATH=/tmp/adaptclip-extra /tmp/anomalyclip-venv/bin/python tools/adaptclip_fixtures.py --official /tmp/adaptclip
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import fixture_io
from fixture_io import perturbed_state, write_fixtures, write_test_pair

OFFICIAL_COMMIT = "354d9e3"
SIZE = 84  # 6 x 6 patches; the native grid is 4 x 4
SHAPE = {  # the official builder's arguments (heads = width // 64)
    "embed_dim": 32, "image_resolution": 56, "vision_layers": 4, "vision_width": 64, "vision_patch_size": 14,
    "context_length": 77, "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 2,
}
DPAM_LAYER = 3  # round(4 * 20 / 24): blocks 3 and 4 are dual-path
FEATURES = [1, 2, 3, 4]
N_CTX, REDUCTION, PQ_MID = 12, 4, 32
CLASSES = ["bottle", "carpet"]
POOL = 3  # normal training images per class: seed 10 then draws 2 distinct ones for 2 shots
SEED = 10  # the scripts' seed (reference sampling, training order)
LEARNERS = ("textual_learner", "visual_learner", "pq_learner")


def synthetic_image(rng: np.random.Generator, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """This fixture's test image and defect mask (:func:`fixture_io.synthetic_image`)."""
    return fixture_io.synthetic_image(rng, SIZE, defect, coarse=4, box=(26, 22), margin=(8, 36), mask_value=255)


def write_dataset(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """meta.json layout: per class POOL normal training images and a good + a defective test image."""
    from PIL import Image

    meta: dict = {"train": {}, "test": {}}
    images, masks, labels, train_images = [], [], [], []
    for cls in CLASSES:
        meta["train"][cls] = []
        for i in range(POOL):
            img, _ = synthetic_image(rng, False)
            rel = f"{cls}/train/good/{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel)
            meta["train"][cls].append(dict(img_path=rel, mask_path="", cls_name=cls, specie_name="good", anomaly=0))
            train_images.append(img.transpose(2, 0, 1))
        entries, imgs, msks, lbls = write_test_pair(root, cls, lambda defect: synthetic_image(rng, defect))
        images += imgs
        masks += msks
        labels += lbls
        meta["test"][cls] = entries
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return {"images": np.stack(images), "masks": np.stack(masks), "labels": np.asarray(labels), "train_images": np.stack(train_images)}


def randomise_adapters(learners: dict[str, torch.nn.Module], calibrate, seed: int) -> None:
    """Random weights for every adapter parameter and realistic, non-trivial BatchNorm statistics:
    each BatchNorm's running statistics are set to the batch statistics of one forward pass of
    the fixture data (``calibrate``), then perturbed, so that eval-mode inference differs from
    train-mode and from the default (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for learner in learners.values():
            for name, p in learner.named_parameters():
                if name.startswith("ctx_"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                elif p.ndim == 1:  # BatchNorm affine, biases
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        bns = [m for learner in learners.values() for m in learner.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.momentum = None  # cumulative average: one pass sets the batch statistics
            m.reset_running_stats()
        for learner in learners.values():
            learner.train()
        calibrate()
        for m in bns:
            m.momentum = 0.1
            m.running_mean.add_(0.1 * m.running_mean.abs().mean() * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.mul_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=g))
            m.num_batches_tracked.fill_(0)
        for learner in learners.values():
            learner.eval()


def unique_state(learner_name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official adapter state dict without the buffers clipad recomputes and without the
    repeated entries of the PQ head lists (index 0 only; the others are the same module)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("token_prefix", "token_suffix", "tokenized_prompts")):
            continue
        if learner_name == "pq_learner" and k.startswith(("local_adapter.", "global_adapter.")) and k.split(".")[1] != "0":
            assert torch.equal(v, sd[".".join([k.split(".")[0], "0", *k.split(".")[2:]])])
            continue
        out[k] = v.detach().clone().contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help=f"checkout of gaobb/AdaptCLIP at {OFFICIAL_COMMIT}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/adaptclip")
    parser.add_argument("--seed", type=int, default=3, help="seed of the random weights and images")
    args = parser.parse_args()

    sys.path.insert(0, str(args.official.resolve()))
    import adaptcliplib
    import adaptcliplib.adaptclip as official_lib
    import test as official_test
    import train as official_train
    from adaptcliplib.build_model import build_model

    work = Path(tempfile.mkdtemp(prefix="adaptclip-fixtures-"))
    rng = np.random.default_rng(args.seed)
    root = work / "data"
    data = write_dataset(root, rng)

    # tokens the prompts use: the learned placeholder prompt and the static ensemble of "object"
    # (the static prompt texts straight from the official class, built on a throwaway model)
    static_normal, static_abnormal = official_lib.TextualAdapter(official_lib.AdaptCLIP(**SHAPE), SIZE, N_CTX).prompt()
    texts = [" ".join(["X"] * N_CTX) + ".", *static_normal, *static_abnormal]
    used = torch.unique(official_lib.tokenize(texts).long())
    torch.manual_seed(args.seed)
    weights = perturbed_state(official_lib.AdaptCLIP(**SHAPE), args.seed, used, round_half=True)

    def load(name, device="cpu", **_):
        return build_model(name, {k: v.clone() for k, v in weights.items()}).float(), None

    original_replace = official_lib.VisionTransformer.DAPM_replace

    def replace(self, DPAM_layer):  # noqa: N803 - the official keyword
        return original_replace(self, DPAM_LAYER)

    adaptcliplib.load = load
    official_lib.VisionTransformer.DAPM_replace = replace
    torch.Tensor.cuda = lambda self, *a, **k: self

    # -- random adapter weights, made with the official classes ---------------------------------
    model, _ = load("ViT-L/14@336px")
    model.visual.DAPM_replace(DPAM_layer=20)
    dim = SHAPE["embed_dim"]
    learners = {
        "textual_learner": official_lib.TextualAdapter(model, SIZE, N_CTX),
        "visual_learner": official_lib.VisualAdapter(SIZE, 14, input_dim=dim, reduction=REDUCTION),
        "pq_learner": official_lib.PQAdapter(SIZE, 14, context=True, input_dim=dim, mid_dim=PQ_MID, layers_num=len(FEATURES)),
    }
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    norm = lambda a: (torch.from_numpy(a).float() / 255 - mean) / std  # noqa: E731
    x, refs = norm(data["images"]), norm(data["train_images"])
    learners["textual_learner"].prepare_static_text_feature(model)

    def calibrate() -> None:
        with torch.no_grad():
            q, qp = model.encode_image(x, FEATURES, DPAM_layer=DPAM_LAYER)
            _, rp = model.encode_image(refs[[0, 1, POOL, POOL + 1]], FEATURES, DPAM_layer=DPAM_LAYER)
            learners["visual_learner"](q, qp, learners["textual_learner"].static_text_features)
            learners["pq_learner"](q, qp, None, [t[:, None] for t in rp])

    randomise_adapters(learners, calibrate, args.seed + 7)
    init = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in learners.items()}
    ckpt = work / "epoch_15.pth"
    torch.save(init, ckpt)

    def seeded(cls, name):
        class Seeded(cls):
            def __init__(self, *a, **k):
                if "input_dim" in k:
                    k["input_dim"] = dim  # the scripts hard-code 768 (ViT-L/14)
                super().__init__(*a, **k)
                self.load_state_dict(init[name])

        return Seeded

    for module in (official_test, official_train):
        module.TextualAdapter = seeded(official_lib.TextualAdapter, "textual_learner")
        module.VisualAdapter = seeded(official_lib.VisualAdapter, "visual_learner")
        module.PQAdapter = seeded(official_lib.PQAdapter, "pq_learner")

    expected: dict[str, torch.Tensor] = {k: torch.from_numpy(v) for k, v in data.items()}
    for name, sd in init.items():
        for k, v in unique_state(name, sd).items():
            expected[f"official/{name}/{k}"] = v

    # -- test.py, 0/1/2 shots ----------------------------------------------------------------
    class Recorder:
        seen: dict = {}

        def __init__(self, *a, metrics=(), **k):
            self.metrics = metrics

        def run(self, results, cls_name, logger):
            Recorder.seen["results"] = results
            return {m: 0.0 for m in self.metrics}

    official_test.Evaluator = Recorder
    train_paths = [f"{c}/train/good/{i:03d}.png" for c in CLASSES for i in range(POOL)]
    for shots in (0, 1, 2):
        save = work / f"test-{shots}"
        ns = argparse.Namespace(
            test_data_path=str(root), save_path=str(save), pretrained_model="ViT-L/14@336px", checkpoint_path=str(ckpt),
            dataset="mvtec", features_list=FEATURES, batch_size=8, image_size=SIZE, n_ctx=N_CTX, seed=SEED, sigma=4,
            k_shots=shots, visual_learner=True, textual_learner=True, pq_learner=True,
            eval_metrics=["I-AUROC"], fusion_type="average_mean", vl_reduction=REDUCTION, pq_mid_dim=PQ_MID,
            pq_context=True, class_name=None,
        )
        official_test.setup_seed(SEED)
        official_test.test(ns)
        res = Recorder.seen["results"]
        expected[f"shot{shots}/maps"] = res["pr_masks"].float().contiguous()
        expected[f"shot{shots}/scores"] = res["pr_anomalys"].float().contiguous()
        if shots:
            drawn = (save / f"mvtec_{SEED}seed_{shots}shot_test_prompts.txt").read_text().split()
            expected[f"shot{shots}/references"] = torch.tensor([train_paths.index(p) for p in drawn])

    # -- train.py, one step ------------------------------------------------------------------
    seen_inputs: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    original_encode = official_lib.AdaptCLIP.encode_image
    original_backward = torch.Tensor.backward

    def encode(self, image, *a, **k):
        seen_inputs.append(image.detach().clone())
        return original_encode(self, image, *a, **k)

    def backward(self, *a, **k):
        losses.append(self.detach().clone())
        return original_backward(self, *a, **k)

    official_lib.AdaptCLIP.encode_image = encode
    torch.Tensor.backward = backward
    try:
        ns = argparse.Namespace(
            train_data_path=str(root), save_path=str(work / "train"), dataset="mvtec", pretrained_model="ViT-L/14@336px",
            n_ctx=N_CTX, features_list=FEATURES, epoch=1, learning_rate=0.001, batch_size=4, image_size=SIZE,
            print_freq=1, save_freq=1, seed=SEED, k_shots=1, visual_learner=True, textual_learner=True, pq_learner=True,
            vl_reduction=REDUCTION, pq_mid_dim=PQ_MID, pq_context=True,
        )
        official_train.setup_seed(SEED)
        official_train.train(ns)
    finally:
        official_lib.AdaptCLIP.encode_image = original_encode
        torch.Tensor.backward = original_backward
    assert len(losses) == 1 and len(seen_inputs) == 2, "expected exactly one optimisation step"

    def match(batch: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        d = (batch[:, None] - candidates[None]).flatten(2).abs().amax(-1)
        assert bool((d.min(dim=1).values < 1e-5).all()), "an input of the official step is not a fixture image"
        return d.argmin(dim=1)

    expected["train/order"] = match(seen_inputs[0], x)
    expected["train/references"] = match(seen_inputs[1], refs)
    expected["train/loss"] = losses[0].reshape(1)
    updated = torch.load(work / "train" / "epoch_1.pth", weights_only=True)
    for name in LEARNERS:
        for k, v in unique_state(name, updated[name]).items():
            expected[f"train/{name}/{k}"] = v

    meta = {"shape": json.dumps(SHAPE), "image_size": str(SIZE), "dpam_layer": str(DPAM_LAYER), "features": json.dumps(FEATURES),
            "n_ctx": str(N_CTX), "reduction": str(REDUCTION), "pq_mid_dim": str(PQ_MID), "classes": json.dumps(CLASSES),
            "official_commit": OFFICIAL_COMMIT, "seed": str(args.seed), "torch": torch.__version__}
    write_fixtures(args.out, weights, expected, meta, used, OFFICIAL_COMMIT, dtype=torch.float16)


if __name__ == "__main__":
    main()
