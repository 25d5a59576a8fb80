"""AdaptCLIP: fidelity to the official code (fixtures), properties on the tiny backbone, training
(one official step, a CPU smoke run) and the official-checkpoint conversion.

The fixtures in ``tests/fixtures/adaptclip/`` were computed by the official AdaptCLIP code
(commit 354d9e3) on a random 4-block CLIP by ``tools/adaptclip_fixtures.py``: ``test.py``'s maps
and image scores with 0, 1 and 2 shots (references drawn by the official sampler) and one step
of ``train.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipad
from _helpers import FIXTURES_DIR, REPO_ROOT, load_openai_fixture, random_images, report_max_diff, tiny_detector, write_folder_dataset
from _tolerance import float32_bound
from clipad import ClipadError
from clipad.train import loop as training
from clipad.backbones.dualpath import first_block_of_dpam_layer
from clipad.methods.adaptclip.model import AdaptCLIP, PromptQueryAdapter, TokenAdapter, convert_official, nearest_reference

FIXTURES = FIXTURES_DIR / "adaptclip"
ATOL_MAPS = 1e-4
ATOL_TRAIN = 1e-5
SIZE = 64  # tiny at 64 px: a 4x4 patch grid keeps property tests fast
LEARNERS = ("textual_learner", "visual_learner", "pq_learner")

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**options) -> AdaptCLIP:
    return tiny_detector("adaptclip", **options)


def _images(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return random_images(n, size, seed=seed)


def _report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return report_max_diff("adaptclip", name, ours, theirs)


# =========================================================================== fixtures


def _official_object(e: dict[str, torch.Tensor], prefix: str, n_layers: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """The official checkpoint structure from the stored tensors: the PQ head lists repeat one
    module, so entries 1.. are copies of entry 0; prompt buffers as the official module holds them."""
    obj: dict[str, dict[str, torch.Tensor]] = {k: {} for k in LEARNERS}
    for key, value in e.items():
        rest = key[len(prefix):]
        if not key.startswith(prefix) or "/" not in rest:
            continue
        learner, name = rest.split("/", 1)
        if learner not in obj:
            continue
        head, *tail = name.split(".")
        if learner == "pq_learner" and head in ("local_adapter", "global_adapter"):
            for i in range(n_layers):
                obj[learner][".".join([head, str(i), *tail[1:]])] = value
        else:
            obj[learner][name] = value
    width = obj["textual_learner"]["ctx_pos"].shape[-1]
    obj["textual_learner"].update({
        "token_prefix_pos": torch.zeros(1, 1, 1, width), "token_suffix_pos": torch.zeros(1, 1, 64, width),
        "token_prefix_neg": torch.zeros(1, 1, 1, width), "token_suffix_neg": torch.zeros(1, 1, 64, width),
        "tokenized_prompts_pos": torch.zeros(1, 1, 77, dtype=torch.int32), "tokenized_prompts_neg": torch.zeros(1, 1, 77, dtype=torch.int32),
    })
    return obj


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    if not (FIXTURES / "model.safetensors").is_file() or not (FIXTURES / "expected.safetensors").is_file():
        pytest.skip(f"AdaptCLIP fixtures missing in {FIXTURES}: build them with tools/adaptclip_fixtures.py (see tools/README.md)")
    tmp = tmp_path_factory.mktemp("adaptclip")
    backbone, meta, expected = load_openai_fixture(FIXTURES, "adaptclip-fixture", tmp)
    size, mid = int(meta["image_size"]), int(meta["pq_mid_dim"])
    init = convert_official(_official_object(expected, "official/"))

    def detector(learned: bool = True, **options) -> AdaptCLIP:
        det = AdaptCLIP(backbone, image_size=size, precision="fp32", pq_mid_dim=mid, **options).eval()
        if learned:
            det.load_learned_state(init.learned)
        return det

    return {"meta": meta, "expected": expected, "detector": detector, "tmp": tmp, "init": init,
            "classes": json.loads(meta["classes"])}


def _predict_classes(det: AdaptCLIP, official: dict, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``test.py``'s loop: per class its two test images, with that class's references."""
    e, classes = official["expected"], official["classes"]
    images, pool = e["images"].float() / 255, e["train_images"].float() / 255
    det._references.clear()
    if shots:
        picks = e[f"shot{shots}/references"].reshape(len(classes), shots)
        for i, c in enumerate(classes):
            det.set_reference(pool[picks[i]], class_name=c)
    scores, maps = [], []
    for i, c in enumerate(classes):
        pred = det.predict(images[2 * i : 2 * i + 2], class_name=c)
        scores.append(pred.image_scores)
        maps.append(pred.anomaly_maps)
    return torch.cat(scores), torch.cat(maps)


def test_fixture_design(official):
    meta, det = official["meta"], official["detector"]()
    assert det.tap_layers == (1, 2, 3, 4)
    assert det.first_vv_block == 4 - int(meta["dpam_layer"]) + 2  # official: the last DPAM_layer - 1 blocks
    assert official["init"].options == {"n_ctx": 12, "va_reduction": int(meta["reduction"]), "pq_mid_dim": int(meta["pq_mid_dim"])}


@pytest.mark.parametrize("shots", [0, 1, 2])
def test_fixture_maps_and_scores(official, shots):
    """``test.py`` with 0, 1 and 2 shots: image scores and Gaussian-smoothed maps within 1e-4."""
    e = official["expected"]
    scores, maps = _predict_classes(official["detector"](), official, shots)
    assert _report(f"{shots}-shot image scores", scores, e[f"shot{shots}/scores"]) < ATOL_MAPS
    assert _report(f"{shots}-shot maps", maps, e[f"shot{shots}/maps"]) < ATOL_MAPS


def test_fixture_tap_quirk_matters(official):
    """The fixture's tap 2 precedes the first dual block: exact_taps=True must differ from the
    official k-shot output (else the fixture would not pin the quirk)."""
    e = official["expected"]
    scores, maps = _predict_classes(official["detector"](exact_taps=True), official, 1)
    assert (maps - e["shot1/maps"]).abs().max() > 1e-3


def test_fixture_training_step(official):
    """``train.py``, one Adam step on the four images with the official references: loss and
    every updated adapter tensor (BatchNorm running statistics included) within 1e-5."""
    e = official["expected"]
    det = official["detector"]()
    det.train()
    config = training.TrainConfig.for_method(det)
    assert (config.lr, config.betas, config.epochs, config.batch_size, config.seed) == (1e-3, (0.5, 0.999), 15, 8, 10)
    optimizer = training.make_optimizer(det, config)
    order, refs = e["train/order"], e["train/references"]
    x = det.backbone.normalize(e["images"][order].float() / 255)
    references = det.backbone.normalize(e["train_images"][refs].float() / 255)[:, None]
    loss, _ = training.train_step(det, optimizer, x, e["masks"][order].float(), e["labels"][order], references=references)
    assert _report("training loss", torch.tensor([loss]), e["train/loss"]) < ATOL_TRAIN
    updated = convert_official(_official_object(e, "train/")).learned
    state = det.learned_state()
    assert state.keys() == updated.keys()
    moved = max((state[k] - official["init"].learned[k]).abs().max().item() for k in state)
    assert moved > 5e-4  # the step did move weights (Adam: about lr)
    # Adam's first step moves a weight by lr * g / (|g| + 1e-8): where |g| is near its epsilon
    # (weights whose effect a later BatchNorm removes, e.g. the per-tap BatchNorm bias feeding
    # the shared head), float32 rounding of g (summation order, threads) is amplified up to
    # lr / (4 eps) = 25000 times; such elements are held to the gradient-noise scale instead.
    params = det._learned_tensors()
    worst, exempt, total = 0.0, 0, 0
    for key in state:
        diff = (state[key] - updated[key]).abs()
        grad = params[key].grad
        flat = grad.abs() < 1e-6 if grad is not None else torch.zeros_like(diff, dtype=torch.bool)
        assert bool((diff[flat] < 2e-3).all()), key  # at most one full Adam step apart
        exempt, total = exempt + int(flat.sum()), total + diff.numel()
        worst = max(worst, diff[~flat].max().item() if (~flat).any() else 0.0)
    print(f"adaptclip fidelity: updated weights: max |diff| {worst:.2e} ({exempt} of {total} elements with |grad| < 1e-6 excluded)")
    assert exempt < 0.01 * total
    assert worst < ATOL_TRAIN


def test_fixture_through_convert(official, tmp_path):
    """The official weights as an official ``.pth``, converted by ``clipad convert``, read back as
    ``checkpoint=`` does: the official 1-shot maps and scores again."""
    e = official["expected"]
    pth, out = tmp_path / "epoch_15.pth", tmp_path / "converted.safetensors"
    torch.save(_official_object(e, "official/"), pth)
    assert _convert_cli(["--from", "adaptclip", str(pth), str(out), "--backbone", "tiny", "--pretrained", "none"]) == 0
    det = official["detector"](learned=False)
    det.load_learned_state(clipad.checkpoint.read_learned_weights(out, "adaptclip"))
    scores, maps = _predict_classes(det, official, 1)
    assert _report("converted 1-shot scores", scores, e["shot1/scores"]) < ATOL_MAPS
    assert _report("converted 1-shot maps", maps, e["shot1/maps"]) < ATOL_MAPS


def _convert_cli(argv: list[str]) -> int:
    from clipad.cli import build_parser

    args = build_parser().parse_args(["convert", *argv])
    return args.func(args)


# =========================================================================== properties (tiny)


@pytest.fixture(scope="module")
def tiny() -> AdaptCLIP:
    det = _tiny(image_size=SIZE)
    det.reset_parameters(5)
    return det.eval()


def test_defaults_and_relative_layers():
    d = _tiny()
    assert d.image_size == 512  # 518 is not a multiple of tiny's patch 16
    assert d.tap_layers == (1, 2, 3, 4) and d.first_vv_block == 3
    assert AdaptCLIP.default_backbone == "ViT-L-14-336" and AdaptCLIP.default_pretrained == "openai"
    assert AdaptCLIP.few_shot and AdaptCLIP.training_references == 1
    # the two official settings: DPAM_layer 20 of 24 (ViT-L/14), 10 of 12 (ViT-B-16+)
    assert first_block_of_dpam_layer(24, 20 / 24) == 6 and first_block_of_dpam_layer(12, 20 / 24) == 4
    assert first_block_of_dpam_layer(24, None) == 25
    assert d.prompts.ctx.shape == (2, 12, 64) and d.prompts.deep is None
    # the head instances are shared: one segmentation head and one image head for all taps
    assert len(d.pq_adapter.norms) == 4
    assert sum(1 for m in d.pq_adapter.modules() if isinstance(m, torch.nn.Conv2d)) == 3


def test_parameter_counts_match_the_paper():
    """ViT-L/14 widths: visual adapter ~0.6 M, prompt-query adapter ~1.2 M (paper: +0.6 M, +1.8 M in all)."""
    visual = sum(p.numel() for p in TokenAdapter(768, 4).parameters())
    pq = sum(p.numel() for p in PromptQueryAdapter(768, 128, 4).parameters())
    assert 0.55e6 < visual < 0.65e6 and 1.1e6 < pq < 1.25e6


@pytest.mark.parametrize("per_query", [False, True])
def test_nearest_reference_equals_explicit_loop(per_query):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 7, 5, generator=g), dim=-1)
    mem = torch.nn.functional.normalize(torch.randn(*((3,) if per_query else ()), 11, 5, generator=g), dim=-1)
    dist, near = nearest_reference(q, mem, chunk=7 * 11)  # one query image per chunk: chunking exercised
    for b in range(3):
        m = mem[b] if per_query else mem
        for n in range(7):
            sims = [float(torch.dot(q[b, n], m[j])) for j in range(m.shape[0])]
            j = int(np.argmax(sims))
            assert abs(dist[b, n].item() - (1.0 - sims[j])) < 1e-6
            assert torch.equal(near[b, n], m[j])


def test_shapes_ranges_and_reference_cache(tiny, monkeypatch):
    x = _images(3, seed=1)
    zero = tiny.predict(x)
    assert zero.image_scores.shape == (3,) and zero.anomaly_maps.shape == (3, SIZE, SIZE)
    assert ((zero.image_scores >= 0) & (zero.image_scores <= 1)).all()
    tiny.set_reference(_images(2, seed=2), class_name="bottle")
    calls: list[int] = []
    original = AdaptCLIP.encode_image
    monkeypatch.setattr(AdaptCLIP, "encode_image", lambda self, t: calls.append(t.shape[0]) or original(self, t))
    few = tiny.predict(x, class_name="bottle")
    again = tiny.predict(x, class_name="bottle")
    assert calls == [3, 3]  # queries only: the reference features are computed once, in set_reference
    assert torch.equal(few.anomaly_maps, again.anomaly_maps)
    assert not torch.allclose(few.anomaly_maps, zero.anomaly_maps)
    assert torch.equal(tiny.predict(x, class_name="carpet").anomaly_maps, zero.anomaly_maps)  # no references: zero-shot
    memory = tiny.reference_for("bottle")
    assert int(memory["shots"]) == 2 and memory["tap_0"].shape == (2 * 16, 64)
    assert torch.allclose(memory["tap_0"].norm(dim=-1), torch.ones(32), atol=1e-5)
    tiny.clear_reference("bottle")


def test_reference_order_and_batch_invariance(tiny):
    """k-shot output does not depend on the order of the references nor on the batch split."""
    x, refs = _images(4, seed=3), _images(3, seed=4)
    tiny.set_reference(refs)
    a = tiny.predict(x, batch_size=4)
    b = tiny.predict(x, batch_size=1)
    tiny.set_reference(refs[[2, 0, 1]])
    c = tiny.predict(x, batch_size=4)
    tiny.clear_reference()
    assert torch.allclose(a.anomaly_maps, b.anomaly_maps, atol=1e-5) and torch.allclose(a.image_scores, b.image_scores, atol=1e-6)
    assert torch.allclose(a.anomaly_maps, c.anomaly_maps, atol=1e-5)


def test_identical_reference_gives_zero_alignment(tiny):
    """A query that is its own reference: every token's nearest reference is itself, so every
    tap's alignment distance (1 - max cos) is zero to float rounding, and the harmonic fusion
    with the alignment map gives a map near zero (the fusion amplifies rounding where distances
    of different taps have opposite signs, so the map bound is looser)."""
    det = _tiny(image_size=SIZE, sigma=0)
    det.load_learned_state(tiny.learned_state())
    x = _images(1, seed=6)
    det.set_reference(x)
    with torch.no_grad():
        _, taps, grid = det.encode_image(det.backbone.normalize(x))
        ref = det.reference_for("object")
        memory = [ref[f"tap_{i}"] for i in range(len(taps))]
        _, _, align = det.pq_adapter([det._unit_patches(t) for t in taps], memory, grid, det.model_size)
    for a in align:
        # 1 - x.x of a unit vector: sums of D squares (the norm, the dot product) of total 1;
        # float32_bound(D, 1) = 5.7e-6 for D = 64 (3.6e-7 seen; 1e-6 was 8 float32 spacings)
        assert a.abs().max() < float32_bound(taps[0].shape[-1], 1.0)
    pred = det.predict(x)
    assert pred.anomaly_maps.abs().max() < 1e-2 and pred.image_scores.abs().max() < 1e-2
    other = det.predict(_images(1, seed=7))  # a different image is far from zero
    assert other.anomaly_maps.abs().max() > 0.1


def test_options_change_the_result(tiny):
    x = tiny.backbone.normalize(_images(2, seed=7))
    base = tiny.score_normalized(x)
    for options in ({"global_ln_post": True}, {"exact_taps": True, "taps": (0.5, 1.0)}, {"dpam_layer": None}):
        other = _tiny(image_size=SIZE, **options)
        own = {k: v for k, v in tiny.learned_state().items() if not k.startswith("pq_adapter.norms")}
        if "taps" not in options:
            own = tiny.learned_state()
        else:
            own.update({k: v for k, v in other.learned_state().items() if k.startswith("pq_adapter.norms")})
        other.load_learned_state(own)
        ref = _images(1, seed=8)
        tiny.set_reference(ref)
        other.set_reference(ref)
        a, b = tiny.score_normalized(x), other.score_normalized(x)
        tiny.clear_reference()
        assert not (torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])), options
    assert base[0].shape == (2,)
    with pytest.raises(ClipadError, match="schedule"):
        _tiny(image_size=SIZE, schedule="joint")
    with pytest.raises(ClipadError, match="dpam_layer"):
        _tiny(image_size=SIZE, dpam_layer=1.5)


def test_alternate_schedule_updates_one_modality_per_step():
    det = _tiny(image_size=SIZE, schedule="alternate")
    det.train()
    opt = training.make_optimizer(det, training.TrainConfig.for_method(det))
    x = det.backbone.normalize(_images(2, seed=9))
    refs = det.backbone.normalize(_images(2, seed=10))[:, None]
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, 8:30, 8:30] = 1
    labels = torch.tensor([0, 1])
    moved = []
    for _ in range(2):
        before = det.learned_state()
        before = {k: v.clone() for k, v in before.items()}
        _, parts = training.train_step(det, opt, x, masks, labels, references=refs)
        after = det.learned_state()
        moved.append({k.split(".")[0] for k in after if not torch.equal(after[k], before[k])})
        assert "pq_ce" in parts
    assert moved[0] == {"visual_adapter", "pq_adapter"} and moved[1] == {"prompts", "pq_adapter"}


def test_learned_state_round_trip_and_errors(tiny, tmp_path):
    x = _images(2, seed=11)
    path = tiny.save(tmp_path / "det.safetensors")
    via_option = _tiny(image_size=SIZE, checkpoint=str(path))
    assert torch.equal(via_option.predict(x).anomaly_maps, tiny.predict(x).anomaly_maps)
    state = tiny.learned_state()
    assert "pq_adapter.norms.0.running_var" in state and not any(k.endswith("num_batches_tracked") for k in state)
    with pytest.raises(ClipadError, match="missing"):
        _tiny(image_size=SIZE).load_learned_state({"prompts.ctx": state["prompts.ctx"]})
    with pytest.raises(ClipadError, match="shape"):
        _tiny(image_size=SIZE, pq_mid_dim=64).load_learned_state(state)


# =========================================================================== conversion


def _as_official(det: AdaptCLIP, n_layers: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """clipad's learned tensors written in the official structure (the inverse of the converter,
    spelled out independently here), buffers and repeated head entries included."""
    s = det.learned_state()
    n_ctx, width = s["prompts.ctx"].shape[1:]
    tl = {"ctx_pos": s["prompts.ctx"][0].reshape(1, 1, n_ctx, width).clone(),
          "ctx_neg": s["prompts.ctx"][1].reshape(1, 1, n_ctx, width).clone(),
          "token_prefix_pos": torch.zeros(1, 1, 1, width), "tokenized_prompts_pos": torch.zeros(1, 1, 77, dtype=torch.int32)}
    vl: dict[str, torch.Tensor] = {}
    for ours, theirs in (("global_mlp", "global_adapter"), ("local_mlp", "local_adater")):
        for part, idx in (("fc1", "0"), ("norm", "1"), ("fc2", "3")):
            for k, v in s.items():
                if k.startswith(f"visual_adapter.{ours}.{part}."):
                    vl[f"{theirs}.fc.{idx}.{k.rsplit('.', 1)[1]}"] = v.clone()
        vl[f"{theirs}.fc.1.num_batches_tracked"] = torch.tensor(3)
    pq: dict[str, torch.Tensor] = {}
    for k, v in s.items():
        if k.startswith("pq_adapter.norms."):
            pq[k.replace("pq_adapter.norms.", "sharebn.")] = v.clone()
        for ours, theirs in (("seg_head", "local_adapter"), ("image_head", "global_adapter")):
            if k.startswith(f"pq_adapter.{ours}."):
                for i in range(n_layers):
                    pq[k.replace(f"pq_adapter.{ours}.", f"{theirs}.{i}.")] = v.clone()
    return {"textual_learner": tl, "visual_learner": vl, "pq_learner": pq}


def test_convert_round_trip(tiny, tmp_path):
    """An official-format .pth (plain tensor dicts) -> ``clipad convert`` -> ``create_detector(...,
    checkpoint=)`` predicts what the detector holding those tensors predicts; ``load_detector``
    reads the converted file too."""
    pth, out = tmp_path / "epoch_15.pth", tmp_path / "out.safetensors"
    torch.save(_as_official(tiny), pth)
    assert _convert_cli(["--from", "adaptclip", str(pth), str(out), "--backbone", "tiny", "--pretrained", "none"]) == 0
    x, refs = _images(2, seed=12), _images(1, seed=13)
    det = _tiny(image_size=SIZE, checkpoint=str(out))
    tiny.set_reference(refs)
    det.set_reference(refs)
    try:
        assert torch.equal(det.predict(x).anomaly_maps, tiny.predict(x).anomaly_maps)
    finally:
        tiny.clear_reference()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        loaded = clipad.load_detector(out, device="cpu")
    assert loaded.image_size == 512 and loaded.options["pq_mid_dim"] == 128
    bad = _as_official(tiny)
    bad["pq_learner"]["local_adapter.2.0.weight"] = bad["pq_learner"]["local_adapter.2.0.weight"] + 1
    with pytest.raises(ClipadError, match="shared"):
        convert_official(bad)
    with pytest.raises(ClipadError, match="not an AdaptCLIP checkpoint"):
        convert_official({"prompt_learner": {}})


# =========================================================================== training loop and CLI


def test_reference_sampler_draws_same_class_normals(tmp_path):
    from clipad.data import Sample

    pool = [Sample(tmp_path / f"t{i}.png", 0, c, split="train") for c in ("a", "b") for i in range(3)]
    queries = [Sample(tmp_path / "qa.png", 1, "a"), Sample(tmp_path / "qb.png", 0, "b"), Sample(tmp_path / "qc.png", 0, "c"),
               Sample(tmp_path / "qc2.png", 0, "c")]
    sampler = training.ReferenceSampler(pool, queries, k=2, size=32, seed=10)
    picks = sampler.draw(queries, step=0)
    assert [len(p) for p in picks] == [2, 2, 2, 2]
    assert all(r.class_name == q.class_name and r.label == 0 for q, p in zip(queries, picks) for r in p)
    assert all(r.image_path != q.image_path for q, p in zip(queries[2:], picks[2:]) for r in p)  # fallback: never itself
    assert sampler.draw(queries, step=0) == picks  # seeded by (seed, step): a resumed run draws the same


def _train_cli(argv: list[str]) -> int:
    from clipad.cli import build_parser

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return args.func(args)


def test_smoke_training_loss_decreases_then_predict(tmp_path):
    root = tmp_path / "data"
    write_folder_dataset(root)
    out = tmp_path / "run"
    argv = ["train", "--method", "adaptclip", "--backbone", "tiny", "--pretrained", "none", "--dataset", "folder",
            "--root", str(root), "--normal-dir", "good", "--abnormal-dir", "bad", "--mask-dir", "masks",
            "--out", str(out), "--image-size", str(SIZE), "--batch-size", "4", "--workers", "0", "--quiet",
            "--lr", "0.01", "--epochs", "5"]
    assert _train_cli(argv) == 0
    with open(out / training.LOG_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 5 * 3 and {"visual_ce", "textual_local", "pq_local"} <= set(rows[0])
    print("adaptclip smoke training loss per step:", " ".join(f"{v:.3f}" for v in losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (first, last)
    final = out / "adaptclip.safetensors"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        loaded = clipad.load_detector(final, device="cpu")
    via_option = _tiny(image_size=SIZE, checkpoint=str(final))
    x = _images(2, seed=14)
    loaded.set_reference([str(p) for p in sorted((root / "good").iterdir())[:1]])
    via_option.set_reference([str(p) for p in sorted((root / "good").iterdir())[:1]])
    assert torch.equal(loaded.predict(x).anomaly_maps, via_option.predict(x).anomaly_maps)
    # and the trained detector evaluates end to end, 1-shot
    from clipad.cli import main

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        rc = main(["eval", "--dataset", "folder", "--root", str(root), "--normal-dir", "good", "--abnormal-dir", "bad",
                   "--mask-dir", "masks", "--detector", str(final), "--shots", "1", "--out", str(tmp_path / "eval")])
    assert rc == 0


def test_predict_cli_with_references(tmp_path):
    from clipad.cli import main

    images = REPO_ROOT / "examples" / "images"
    if not images.is_dir():
        pytest.skip("examples/images missing")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        rc = main(["predict", str(images), "--method", "adaptclip", "--backbone", "tiny", "--pretrained", "none",
                   "--reference", str(images), "--out", str(tmp_path / "x"), "--image-size", str(SIZE)])
    assert rc == 0
    assert (tmp_path / "x" / "scores.csv").is_file()
