"""AnomalyCLIP: fidelity to the official code (fixtures), properties on the tiny backbone, the
training loop (smoke run, resume) and the official-checkpoint conversion.

The fixtures in ``tests/fixtures/anomalyclip/`` were computed by the official AnomalyCLIP code
(commit 45ed4dd) on a random 4-block CLIP by ``tools/anomalyclip_fixtures.py``: the tokenised
prompts and prompt embeddings, the maps and image scores of its ``test.py`` and one step of its
``train.py``, each in two settings (``last``: the scripts' single last-layer tap; ``multi``: four
taps with the dual path from block 2).
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
from _helpers import FIXTURES_DIR, load_openai_fixture, random_images, report_max_diff, tiny_detector, write_folder_dataset
from clipad import ClipadError
from clipad.train import loop as training
from clipad.convert import convert_checkpoint, read_learned_weights
from clipad.methods.anomalyclip.model import AnomalyCLIP
from clipad.components.prompt_learning import LearnablePrompts, encode_prompt_embeddings

FIXTURES = FIXTURES_DIR / "anomalyclip"
ATOL_MAPS = 1e-4
ATOL_TRAIN = 1e-5
SIZE = 64  # tiny at 64 px: a 4x4 patch grid keeps property tests fast
# fixture setting -> clipad options (taps as fractions of 4 blocks; dual path from block 1 or 2)
SETTINGS = {"last": {"taps": (1.0,), "dpam_start": 0.25}, "multi": {"taps": (0.25, 0.5, 0.75, 1.0), "dpam_start": 0.5}}

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**options) -> AnomalyCLIP:
    return tiny_detector("anomalyclip", **options)


def _images(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return random_images(n, size, seed=seed)


def _report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return report_max_diff("anomalyclip", name, ours, theirs)


# =========================================================================== fixtures


def _official_learned(e: dict[str, torch.Tensor], prefix: str = "official/") -> dict[str, torch.Tensor]:
    """Official prompt-learner tensors -> clipad's learned state (the mapping ``convert`` applies)."""
    n_deep = len([k for k in e if k.startswith(f"{prefix}compound_prompts_text.")])
    pos, neg = e[f"{prefix}ctx_pos"], e[f"{prefix}ctx_neg"]
    return {
        "prompts.ctx": torch.cat([pos.reshape(1, *pos.shape[-2:]), neg.reshape(1, *neg.shape[-2:])]),
        "prompts.deep": torch.stack([e[f"{prefix}compound_prompts_text.{i}"] for i in range(n_deep)]),
    }


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    if not (FIXTURES / "model.safetensors").is_file() or not (FIXTURES / "expected.safetensors").is_file():
        pytest.skip(f"AnomalyCLIP fixtures missing in {FIXTURES}: build them with tools/anomalyclip_fixtures.py (see tools/README.md)")
    tmp = tmp_path_factory.mktemp("anomalyclip")
    backbone, meta, expected = load_openai_fixture(FIXTURES, "anomalyclip-fixture", tmp)
    design = json.loads(meta["design"])
    size = int(meta["image_size"])

    def detector(setting: str, learned: bool = True, **options) -> AnomalyCLIP:
        det = AnomalyCLIP(
            backbone, image_size=size, precision="fp32", n_ctx=design["Prompt_length"],
            deep_depth=design["learnabel_text_embedding_depth"], deep_length=design["learnabel_text_embedding_length"],
            **SETTINGS[setting], **options,
        ).eval()
        if learned:
            det.load_learned_state(_official_learned(expected))
        return det

    return {"meta": meta, "expected": expected, "backbone": backbone, "detector": detector, "tmp": tmp}


def test_fixture_prompts(official):
    """Same token ids as the official tokeniser, same normalised prompt embeddings."""
    e = official["expected"]
    det = official["detector"]("last")
    ids = det.prompts.token_ids
    official_ids = e["tokenized_prompts"]
    assert torch.equal(ids, official_ids[:, : ids.shape[1]])
    assert not official_ids[:, ids.shape[1] :].any()  # nothing but padding was cut
    assert _report("prompt embeddings", det.text_features(), e["text_features"]) < 1e-5


@pytest.mark.parametrize("setting", ["last", "multi"])
def test_fixture_maps_and_scores(official, setting):
    """``test.py``: image scores and Gaussian-smoothed maps (summed over taps) within 1e-4."""
    e = official["expected"]
    det = official["detector"](setting)
    pred = det.predict(e["images"].float() / 255)
    assert _report(f"{setting} image scores", pred.image_scores, e[f"{setting}/scores"]) < ATOL_MAPS
    assert _report(f"{setting} maps", pred.anomaly_maps, e[f"{setting}/maps"]) < ATOL_MAPS


@pytest.mark.parametrize("setting", ["last", "multi"])
def test_fixture_training_step(official, setting):
    """``train.py``, one Adam step on the four images: loss, its terms and the updated prompts within 1e-5."""
    e = official["expected"]
    det = official["detector"](setting)
    det.train()
    config = training.TrainConfig.for_method(det)
    assert (config.lr, config.betas, config.epochs, config.batch_size, config.seed) == (1e-3, (0.5, 0.999), 15, 8, 111)
    optimizer = training.make_optimizer(det, config)
    x = det.backbone.normalize(e["images"].float() / 255)
    loss, parts = training.train_step(det, optimizer, x, e["masks"].float(), e["labels"])
    assert _report(f"{setting} loss", torch.tensor([loss]), e[f"{setting}/train/loss"]) < ATOL_TRAIN
    for name in ("focal", "dice_abnormal", "dice_normal"):
        assert abs(parts[name] - e[f"{setting}/train/{name}"].sum().item()) < ATOL_TRAIN, name
    assert abs(parts["image_ce"] - e[f"{setting}/train/image_ce"].item()) < ATOL_TRAIN
    updated = _official_learned(e, prefix=f"{setting}/train/")
    state = det.learned_state()
    moved = (state["prompts.ctx"] - _official_learned(e)["prompts.ctx"]).abs().max()
    assert moved > 5e-4  # one Adam step moves each weight by about lr = 1e-3
    for key in state:
        assert _report(f"{setting} updated {key}", state[key], updated[key]) < ATOL_TRAIN


def _official_checkpoint(ctx_pos, ctx_neg, deep: list[torch.Tensor], width: int) -> dict:
    """An object shaped like the official ``{"prompt_learner": state_dict}`` (projections and buffers included)."""
    g = torch.Generator().manual_seed(1)
    sd = {"ctx_pos": ctx_pos, "ctx_neg": ctx_neg}
    for i, d in enumerate(deep):
        sd[f"compound_prompts_text.{i}"] = d
        sd[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, width, generator=g)
        sd[f"compound_prompt_projections.{i}.bias"] = torch.randn(896, generator=g)
    for k in ("token_prefix_pos", "token_prefix_neg"):
        sd[k] = torch.randn(1, 1, 1, width, generator=g)
    for k in ("token_suffix_pos", "token_suffix_neg"):
        sd[k] = torch.randn(1, 1, 64, width, generator=g)
    sd["tokenized_prompts_pos"] = torch.zeros(1, 1, 77, dtype=torch.int32)
    sd["tokenized_prompts_neg"] = torch.zeros(1, 1, 77, dtype=torch.int32)
    return {"prompt_learner": sd}


def test_fixture_through_convert(official):
    """The official weights written as an official checkpoint, converted, and read back as
    ``checkpoint=`` does: the official maps and scores again."""
    e = official["expected"]
    n_deep = len([k for k in e if k.startswith("official/compound_prompts_text.")])
    obj = _official_checkpoint(e["official/ctx_pos"], e["official/ctx_neg"],
                               [e[f"official/compound_prompts_text.{i}"] for i in range(n_deep)], e["official/ctx_pos"].shape[-1])
    pth, out = official["tmp"] / "epoch_1.pth", official["tmp"] / "converted.safetensors"
    torch.save(obj, pth)
    convert_checkpoint("anomalyclip", pth, out, backbone="tiny", pretrained=None)
    det = official["detector"]("last", learned=False)
    det.load_learned_state(read_learned_weights(out, "anomalyclip"))
    pred = det.predict(e["images"].float() / 255)
    assert _report("converted scores", pred.image_scores, e["last/scores"]) < ATOL_MAPS
    assert _report("converted maps", pred.anomaly_maps, e["last/maps"]) < ATOL_MAPS


# =========================================================================== properties (tiny)


@pytest.fixture(scope="module")
def tiny() -> AnomalyCLIP:
    return _tiny(image_size=SIZE)


def test_defaults_and_relative_layers(tiny):
    d = _tiny()  # image_size default: 518 is not a multiple of tiny's patch 16 -> 512
    assert d.image_size == 512 and tiny.image_size == SIZE
    assert tiny.backbone.depth == 4
    assert tiny.tap_layers == (4,) and tiny.first_vv_block == 1  # block 24 / block 6 of ViT-L's 24
    four = _tiny(image_size=SIZE, taps=(0.25, 0.5, 0.75, 1.0))
    assert four.tap_layers == (1, 2, 3, 4)
    assert tiny.prompts.n_deep == 1  # depth 9 on a 2-layer text tower: only layer 2 takes deep prompts
    assert tiny.prompts.ctx.shape == (2, 12, 64)
    assert AnomalyCLIP.default_backbone == "ViT-L-14-336" and AnomalyCLIP.default_pretrained == "openai"


def test_scores_and_maps_ranges(tiny):
    x = _images(3, seed=1)
    pred = tiny.predict(x)
    assert ((pred.image_scores >= 0) & (pred.image_scores <= 1)).all()
    assert ((pred.anomaly_maps >= -1e-6) & (pred.anomaly_maps <= 1 + 1e-6)).all()  # one tap: a probability, blurred
    four = _tiny(image_size=SIZE, taps=(0.25, 0.5, 0.75, 1.0)).predict(x)
    assert four.anomaly_maps.max() > 1  # four taps are summed, not averaged
    assert (four.anomaly_maps <= 4 + 1e-5).all()


def test_object_agnostic(tiny):
    x = _images(2, seed=2)
    a, b = tiny.predict(x, class_name="bottle"), tiny.predict(x, class_name="carpet")
    assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)


def test_map_is_blurred_probability_sum(tiny):
    """sigma=0 gives (p_a + 1 - p_n) / 2 = p_a summed over taps; sigma=4 is its scipy Gaussian;
    the image score never depends on the map."""
    from scipy.ndimage import gaussian_filter

    x = tiny.backbone.normalize(_images(2, seed=3))
    raw = _tiny(image_size=SIZE, sigma=0)
    raw.load_learned_state(tiny.learned_state())
    s0, m0 = raw.score_normalized(x)
    s4, m4 = tiny.score_normalized(x)
    assert torch.equal(s0, s4)
    ref = np.stack([gaussian_filter(m, sigma=4) for m in m0.numpy()])
    assert np.abs(m4.numpy() - ref).max() < 1e-5
    # the per-patch abnormal probability, computed independently of the method's helpers
    text = tiny.text_features()
    with torch.no_grad():
        from clipad.backbones.dualpath import encode_image_dualpath

        feats = encode_image_dualpath(tiny.backbone, x, 1, vv_taps=(4,), pos_interp="bilinear")
        tokens = tiny.backbone.project(feats.vv_taps[4])[:, 1:]
    p = torch.softmax(torch.nn.functional.normalize(tokens, dim=-1) @ text.T / 0.07, dim=-1)[..., 1]
    up = torch.nn.functional.interpolate(p.reshape(2, 1, 4, 4), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    assert (m0 - up).abs().max() < 1e-5


def test_global_feature_quirk(tiny):
    """Default: the original path's CLS @ proj without ln_post; global_ln_post=True: vanilla CLIP."""
    x = tiny.backbone.normalize(_images(2, seed=4))
    with torch.no_grad():
        vanilla = tiny.backbone.encode_image(x, pos_interp="bilinear")
        last = tiny.backbone.encode_image(x, layers=(4,), pos_interp="bilinear").taps[4]
    text = tiny.text_features()
    prob = lambda f: torch.softmax(torch.nn.functional.normalize(f, dim=-1) @ text.T / 0.07, dim=-1)[:, 1]  # noqa: E731
    fixed = _tiny(image_size=SIZE, global_ln_post=True)
    s_default, _ = tiny.score_normalized(x)
    s_fixed, _ = fixed.score_normalized(x)
    assert (s_default - prob(last[:, 0] @ tiny.backbone.visual.proj)).abs().max() < 1e-6
    assert (s_fixed - prob(vanilla.cls)).abs().max() < 1e-6
    assert not torch.allclose(s_default, s_fixed)


def test_no_dual_path_gives_vanilla_tokens(tiny):
    x = tiny.backbone.normalize(_images(1, seed=5))
    det = _tiny(image_size=SIZE, dpam_start=None, sigma=0)
    with torch.no_grad():
        _, taps, _ = det.encode_image(x)
        ref = tiny.backbone.encode_image(x, layers=(4,), pos_interp="bilinear").taps[4]
    assert (taps[0] - tiny.backbone.project(ref)).abs().max() < 1e-5


def test_learned_state_round_trip_and_errors(tiny, tmp_path):
    other = _tiny(image_size=SIZE)
    other.reset_parameters(123)
    x = _images(2, seed=6)
    assert not torch.equal(other.predict(x).anomaly_maps, tiny.predict(x).anomaly_maps)
    path = other.save(tmp_path / "det.safetensors")
    via_option = _tiny(image_size=SIZE, checkpoint=str(path))
    assert torch.equal(via_option.predict(x).anomaly_maps, other.predict(x).anomaly_maps)
    # a detector made from a checkpoint file carries its tensors: the source may go away
    resaved = via_option.save(tmp_path / "resaved.safetensors")
    path.unlink()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        again = clipad.load_detector(resaved, device="cpu")
    assert torch.equal(again.predict(x).anomaly_maps, other.predict(x).anomaly_maps)
    assert via_option.options["checkpoint"] == str(path)  # its own record is unchanged
    with pytest.raises(ClipadError, match="shape"):
        tiny.load_learned_state({"prompts.ctx": torch.zeros(2, 8, 64), "prompts.deep": torch.zeros(1, 4, 64)})
    with pytest.raises(ClipadError, match="missing"):
        tiny.load_learned_state({"prompts.ctx": torch.zeros(2, 12, 64)})
    winclip = _tiny_method("winclip").save(tmp_path / "w.safetensors")
    with pytest.raises(ClipadError, match="winclip"):
        _tiny(image_size=SIZE, checkpoint=str(winclip))
    with pytest.raises(ClipadError, match="taps"):
        _tiny(image_size=SIZE, taps=(0.0,))


def _tiny_method(method: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", image_size=SIZE)


# =========================================================================== prompt learning


def test_prompts_with_placeholder_vectors_equal_plain_text(tiny):
    """Context vectors equal to the placeholder's own token embedding, no deep prompts: exactly
    the text tower on the tokenised text (AdaptCLIP's textual-adapter form)."""
    bb = tiny.backbone
    prompts = LearnablePrompts(bb, ("{}.", "{} damaged object."), n_ctx=5)
    x_id = bb.tokenizer(["X"])[0, 1]
    with torch.no_grad():
        prompts.ctx.copy_(bb.clip.token_embedding.weight[x_id].expand_as(prompts.ctx))
        ours = prompts(bb)
        ref = bb.clip.encode_text(bb.tokenizer(["X X X X X.", "X X X X X damaged object."]))
    assert (ours - ref).abs().max() < 1e-5


def test_prompt_truncation_is_exact(tiny):
    """Cutting after the end-of-text token changes nothing (causal mask), deep prompts included."""
    bb, p = tiny.backbone, tiny.prompts
    full_ids = bb.tokenizer([t.format(" ".join(["X"] * p.n_ctx)) for t in p.texts])
    full = bb.clip.token_embedding(full_ids)
    full = torch.cat([full[:, :1], p.ctx, full[:, 1 + p.n_ctx :]], dim=1)
    with torch.no_grad():
        ref = encode_prompt_embeddings(bb, full, full_ids.argmax(-1), p.deep)
        ours = p(bb)
    assert full.shape[1] == 77 > p.token_ids.shape[1]
    assert (ours - ref).abs().max() < 1e-5


def test_deep_prompts_matter_and_get_gradients(tiny):
    bb = tiny.backbone
    p = LearnablePrompts(bb, ("{} object.", "{} damaged object."), n_ctx=12, deep_depth=9, deep_length=4, seed=3)
    out = p(bb)
    out.sum().backward()
    assert p.ctx.grad.abs().sum() > 0 and p.deep.grad.abs().sum() > 0
    assert not any(q.grad is not None for q in bb.parameters())
    with torch.no_grad():
        p.deep.add_(0.5)
        assert not torch.allclose(p(bb), out)
    assert LearnablePrompts(bb, ("{}.", "{}."), n_ctx=12).deep is None  # AdaptCLIP: no deep prompts
    with pytest.raises(ClipadError, match="start with"):
        LearnablePrompts(bb, ("object {}",), n_ctx=4)


# =========================================================================== training loop


def _train_cli(argv: list[str]) -> int:
    """``clipad train`` through its own parser (the CLI registers it the same way)."""
    from clipad.cli import build_parser

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return args.func(args)


def _losses(out: Path) -> list[float]:
    with open(out / training.LOG_CSV, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_folder_dataset(root)
    return root


def _common_args(root: Path, out: Path) -> list[str]:
    return ["train", "--method", "anomalyclip", "--backbone", "tiny", "--pretrained", "none", "--dataset", "folder",
            "--root", str(root), "--normal-dir", "good", "--abnormal-dir", "bad", "--mask-dir", "masks",
            "--out", str(out), "--image-size", str(SIZE), "--batch-size", "4", "--workers", "0", "--quiet", "--lr", "0.01"]


def test_smoke_training_loss_decreases(folder_data, tmp_path):
    out = tmp_path / "run"
    assert _train_cli(_common_args(folder_data, out) + ["--epochs", "8"]) == 0
    losses = _losses(out)
    assert len(losses) == 8 * 3  # 12 images, batch 4
    print("anomalyclip smoke training loss per step:", " ".join(f"{v:.3f}" for v in losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (first, last)
    log = json.loads((out / training.LOG_JSON).read_text())
    assert [e["epoch"] for e in log["epochs"]] == list(range(1, 9)) and log["run"]["data"]["images"] == 12
    # the final file is a detector checkpoint and a learned-weights file
    final = out / "anomalyclip.safetensors"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        loaded = clipad.load_detector(final, device="cpu")
    via_option = _tiny(image_size=SIZE, checkpoint=str(final))
    x = _images(2, seed=9)
    assert torch.equal(loaded.predict(x).anomaly_maps, via_option.predict(x).anomaly_maps)
    fresh = _tiny(image_size=SIZE)
    fresh.reset_parameters(111)
    assert not torch.equal(fresh.predict(x).anomaly_maps, loaded.predict(x).anomaly_maps)


def test_resume_equals_uninterrupted(folder_data, tmp_path):
    """3 epochs straight == 1 epoch, then resumed; and a run stopped mid-epoch resumes from its
    last complete epoch to the same result. Optimizer state included, bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train_cli(_common_args(folder_data, straight) + ["--epochs", "3"]) == 0
    assert _train_cli(_common_args(folder_data, split) + ["--epochs", "3", "--max-steps", "5"]) == 0  # stops in epoch 2
    assert training.last_checkpoint(split)[0] == 1
    assert _train_cli(_common_args(folder_data, split) + ["--epochs", "3", "--resume"]) == 0
    a = read_learned_weights(straight / "anomalyclip.safetensors", "anomalyclip")
    b = read_learned_weights(split / "anomalyclip.safetensors", "anomalyclip")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    oa = load_file(str(training.epoch_paths(straight, 3)[1]))
    ob = load_file(str(training.epoch_paths(split, 3)[1]))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert _losses(straight) == _losses(split)  # the log was cut back to the resumed step
    with pytest.raises(ClipadError, match="seed"):
        _train_cli(_common_args(folder_data, split) + ["--epochs", "4", "--resume", "--seed", "1"])


def test_fine_tune_from_detector_keeps_weights(folder_data, tmp_path):
    """--detector FILE starts from that detector's prompts (no re-initialisation)."""
    start = _tiny(image_size=SIZE)
    start.reset_parameters(7)
    path = start.save(tmp_path / "start.safetensors")
    out = tmp_path / "ft"
    args = _common_args(folder_data, out) + ["--detector", str(path), "--epochs", "1", "--max-steps", "1", "--lr", "1e-9"]
    assert _train_cli(args) == 0
    tuned = read_learned_weights(out / "anomalyclip.safetensors", "anomalyclip")
    for k, v in start.learned_state().items():
        assert (tuned[k] - v).abs().max() < 1e-6  # a 1e-9 step away, not a fresh draw


def test_optimizer_state_round_trip(tiny, tmp_path):
    det = _tiny(image_size=SIZE)
    det.train()
    opt = training.make_optimizer(det, training.TrainConfig.for_method(det))
    x = det.backbone.normalize(_images(2, seed=10))
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, 10:30, 10:30] = 1
    training.train_step(det, opt, x, masks, torch.tensor([0, 1]))
    training.save_optimizer(opt, tmp_path / "o.safetensors")
    opt2 = training.make_optimizer(det, training.TrainConfig.for_method(det))
    training.load_optimizer(opt2, tmp_path / "o.safetensors")
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["betas"] == tuple(s2["param_groups"][0]["betas"])
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(v, s2["state"][pid][k])


def test_official_preprocessing_of_training_masks():
    """Masks: 0/255, PIL bilinear resize, > 0.5 (the official Resize + ToTensor + threshold)."""
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:6, 3:8] = True
    out = training.official_mask(mask, 20)
    ref = np.asarray(Image.fromarray(mask.numpy().astype(np.uint8) * 255).resize((20, 20), Image.BILINEAR)) / 255.0 > 0.5
    assert out.shape == (20, 20) and np.array_equal(out.numpy() > 0, ref)
    assert not training.official_mask(None, 8).any()
    orders = training.epoch_orders(10, 111)
    first, second = next(orders), next(orders)
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, second)
    assert torch.equal(next(training.epoch_orders(10, 111)), first)


# =========================================================================== conversion


def test_convert_round_trip(tmp_path):
    """An official-format .pth of random prompts (depth 9: 8 deep sets) -> convert -> the same
    predictions as loading the tensors directly; tiny's 2-layer tower uses the first deep set."""
    g = torch.Generator().manual_seed(4)
    width = 64
    ctx_pos, ctx_neg = torch.randn(1, 1, 12, width, generator=g), torch.randn(1, 1, 12, width, generator=g)
    deep = [torch.randn(4, width, generator=g) for _ in range(8)]
    pth = tmp_path / "epoch_15.pth"
    torch.save(_official_checkpoint(ctx_pos, ctx_neg, deep, width), pth)
    out = convert_checkpoint("anomalyclip", pth, tmp_path / "out.safetensors", backbone="tiny", pretrained=None)

    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    notes = json.loads(meta["converted_from"])
    assert "compound_prompt_projections.*" in notes["dropped"] and "token_prefix_pos" in notes["dropped"]
    assert json.loads(meta["options"])["deep_depth"] == 9

    direct = _tiny()
    direct.load_learned_state({"prompts.ctx": torch.cat([ctx_pos[0], ctx_neg[0]]), "prompts.deep": torch.stack(deep[:1])})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        loaded = clipad.load_detector(out, device="cpu")
    via_option = _tiny(checkpoint=str(out))
    x = _images(2, size=96, seed=11)
    ref = direct.predict(x)
    for det in (loaded, via_option):
        pred = det.predict(x)
        assert torch.equal(pred.image_scores, ref.image_scores) and torch.equal(pred.anomaly_maps, ref.anomaly_maps)


def test_convert_rejects_other_files(tmp_path):
    bad = tmp_path / "x.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, bad)
    with pytest.raises(ClipadError, match="prompt_learner"):
        convert_checkpoint("anomalyclip", bad, tmp_path / "o.safetensors")
    with pytest.raises(ClipadError, match="does not exist"):
        convert_checkpoint("anomalyclip", tmp_path / "missing.pth", tmp_path / "o.safetensors")
    with pytest.raises(ClipadError, match="unknown source"):
        convert_checkpoint("nope", bad, tmp_path / "o.safetensors")
