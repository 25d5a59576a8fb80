"""AdaCLIP: fidelity to the official code (fixtures), the official-checkpoint conversion, the
quirks on the tiny backbone and the training loop.

The fixtures in ``tests/fixtures/adaclip/`` were computed by the official AdaCLIP code
(caoyunkang/AdaCLIP, commit e27ee32bf19be149795c8c8972d4c3c88cd5a496) by
``tools/adaclip_fixtures.py`` on a random 8-block CLIP (GELU, native 56 px run at 168 px): the
sentence token ids, per image the maps before and after the Gaussian, the image scores and the
fusion's k-means labels (``random_state=0``), the trainer's checkpoint and one official
``train_one_batch`` step (loss, its terms, updated tensors).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipad
from _helpers import FIXTURES_DIR, random_images, report_max_diff, tiny_detector, write_folder_dataset
from _tolerance import float32_bound
from clipad import ClipadError
from clipad.convert import convert_checkpoint, read_learned_weights
from clipad.methods.adaclip.model import AdaCLIP, hybrid_semantic_fusion, sentences
from clipad.train import loop as training

FIXTURES = FIXTURES_DIR / "adaclip"
OFFICIAL_COMMIT = "e27ee32bf19be149795c8c8972d4c3c88cd5a496"
ATOL = 1e-5  # fidelity: fp32, CPU
SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def _report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return report_max_diff("adaclip", name, ours, theirs)


# =========================================================================== fixtures


def _load_backbone(tmp: Path):
    """The fixture's random CLIP (OpenAI layout, native 56 px) as a GELU clipad backbone: what the
    official ``create_model`` builds from OpenAI weights, and ``config_activation`` asks for."""
    import open_clip
    from safetensors import safe_open
    from safetensors.torch import load_file

    from clipad.backbones.clip import OPENAI_MEAN, OPENAI_STD, Backbone, _load_into

    with safe_open(str(FIXTURES / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    shape = json.loads(meta["shape"])
    w = {k: v.float() for k, v in load_file(str(FIXTURES / "model.safetensors")).items()}
    ids, rows = w.pop("token_ids").long(), w.pop("token_rows")
    table = torch.zeros(shape["vocab_size"], shape["transformer_width"])
    table[ids] = rows
    w["token_embedding.weight"] = table
    cfg = {
        "embed_dim": shape["embed_dim"],
        "vision_cfg": {"image_size": shape["image_resolution"], "layers": shape["vision_layers"], "width": shape["vision_width"],
                       "head_width": shape["vision_head_width"], "patch_size": shape["vision_patch_size"]},
        "text_cfg": {"context_length": shape["context_length"], "vocab_size": shape["vocab_size"],
                     "width": shape["transformer_width"], "heads": shape["transformer_heads"], "layers": shape["transformer_layers"]},
    }
    with torch.random.fork_rng(devices=[]):
        model = open_clip.model.CLIP(**cfg, quick_gelu=False)
    _load_into(model, w, "adaclip fixture")
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=shape["context_length"])
    return Backbone(model, name="adaclip-fixture", pretrained=None, mean=OPENAI_MEAN, std=OPENAI_STD, tokenizer=tokenizer), meta


def _official_learned(e: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + len("clip_model."):]: v for k, v in e.items() if k.startswith(prefix + "clip_model.")}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    from safetensors.torch import load_file

    if not (FIXTURES / "model.safetensors").is_file() or not (FIXTURES / "expected.safetensors").is_file():
        pytest.skip(f"AdaCLIP fixtures missing in {FIXTURES}: build them with tools/adaclip_fixtures.py")
    tmp = tmp_path_factory.mktemp("adaclip")
    backbone, meta = _load_backbone(tmp)
    assert meta["official_commit"] == OFFICIAL_COMMIT
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    design = json.loads(meta["design"])
    images = json.loads(meta["images"])

    def detector(learned: bool = True, **options) -> AdaCLIP:
        det = AdaCLIP(backbone, image_size=int(meta["image_size"]), precision="fp32", prompt_depth=design["prompting_depth"],
                      prompt_length=design["prompting_length"], n_clusters=design["k_clusters"], **options).eval()
        if learned:
            det.load_learned_state(_official_learned(expected, "official/"))
        return det

    return {"meta": meta, "expected": expected, "detector": detector, "images": images, "tmp": tmp}


def _record_labels(det: AdaCLIP) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    own = det.cluster

    def cluster(data, n):
        labels = own(data, n)
        seen.append(np.asarray(labels))
        return labels

    det.cluster = cluster  # type: ignore[method-assign]
    return seen


def _by_class(images: list) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, (cls, _) in enumerate(images):
        groups.setdefault(cls, []).append(i)
    return groups


def test_fixture_sentences(official):
    """The official sentences: same token ids for each class ('-' -> ' ', '_' kept, state-major)."""
    det = official["detector"]()
    for cls in ("metal_nut", "pill-box"):
        texts, n_normal = sentences(cls)
        assert n_normal == 28 and len(texts) == 48
        assert torch.equal(det.backbone.tokenize(texts).cpu(), official["expected"][f"tokens/{cls}"])
    assert "metal_nut" in sentences("metal_nut")[0][0] and "pill box" in sentences("pill-box")[0][0]


def test_fixture_maps_and_scores(official):
    """``AdaCLIP.forward`` + ``gaussian_filter(sigma=4)``: k-means labels identical (same seed),
    maps before and after smoothing and image scores within 1e-5; a class's images in one batch."""
    e = official["expected"]
    det, raw = official["detector"](), official["detector"](sigma=0.0)
    x = e["images"].float() / 255
    for cls, rows in _by_class(official["images"]).items():
        seen = _record_labels(det)
        pred = det.predict(x[rows], class_name=cls, batch_size=len(rows))
        pred_raw = raw.predict(x[rows], class_name=cls, batch_size=len(rows))
        for j, i in enumerate(rows):
            assert np.array_equal(seen[j], e[f"eval/{i}/kmeans_labels"].numpy()), f"k-means labels of image {i}"
            assert _report(f"image {i} score", pred.image_scores[j : j + 1], e[f"eval/{i}/score"]) < ATOL
            assert _report(f"image {i} raw map", pred_raw.anomaly_maps[j], e[f"eval/{i}/map_raw"]) < ATOL
            assert _report(f"image {i} map", pred.anomaly_maps[j], e[f"eval/{i}/map"]) < ATOL
    assert float(e["eval/0/map"].max()) > 0.5 > float(e["eval/2/score"])  # non-degenerate fixture


def test_fixture_scores_with_injected_labels(official):
    """With the official labels injected the scores match whatever the local k-means does, and
    other labels change them (the fusion uses them)."""
    e = official["expected"]
    det = official["detector"]()
    x = e["images"].float() / 255
    for i, (cls, _) in enumerate(official["images"]):
        det.cluster = lambda data, n, i=i: e[f"eval/{i}/kmeans_labels"].numpy()  # type: ignore[method-assign]
        assert _report(f"image {i} score (labels injected)", det.predict(x[i : i + 1], class_name=cls).image_scores,
                       e[f"eval/{i}/score"]) < ATOL
    det.cluster = lambda data, n: np.arange(len(data)) % n  # type: ignore[method-assign]
    moved = det.predict(x[1:2], class_name="metal_nut").image_scores
    assert (moved - e["eval/1/score"]).abs().max() > 1e-4


def test_fixture_training_step(official):
    """``train_one_batch``: one AdamW step on the defective image: loss, its terms (image focal,
    then per tap focal, dice(abnormal), dice(normal)) and every updated tensor."""
    e = official["expected"]
    det = official["detector"]()
    det.train()
    config = training.TrainConfig.for_method(det)
    assert (config.lr, config.betas, config.epochs, config.batch_size, config.seed) == (0.01, (0.5, 0.999), 5, 1, 111)
    optimizer = training.make_optimizer(det, config)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.01
    i, cls = 1, official["images"][1][0]
    seen = _record_labels(det)
    x = det.backbone.normalize(e["images"][i : i + 1].float() / 255)
    loss, parts = training.train_step(det, optimizer, x, e["masks"][i : i + 1].float(), e["labels"][i : i + 1], [cls])
    assert np.array_equal(seen[0], e["train/kmeans_labels"].numpy())
    terms = e["train/terms"]
    tol = float32_bound(64, float(e["train/loss"]))
    assert _report("training loss", torch.tensor([loss]), e["train/loss"]) < tol
    assert abs(parts["image_focal"] - terms[0].item()) < ATOL
    for name, start in (("focal", 1), ("dice_abnormal", 2), ("dice_normal", 3)):
        assert abs(parts[name] - terms[start::3].sum().item()) < ATOL, name
    before = _official_learned(e, "official/")
    after = _official_learned(e, "train/")
    state = det.learned_state()
    assert (state["visual_prompter.static_prompts.1"] - before["visual_prompter.static_prompts.1"]).abs().max() > 5e-3
    assert torch.equal(state["text_prompter.static_prompts.0"], before["text_prompter.static_prompts.0"])  # never used
    # The first AdamW step moves w by lr * g / (|g| + eps) (+ the decay): where |g| is near eps
    # (1e-8) that is ill-conditioned, d/dg = eps / (|g| + eps)^2 <= 1 / (4 eps) = 2.5e7, so a float32
    # difference dg in the gradient moves the update by lr dg eps / (|g| + eps)^2. Tolerance per
    # element: ATOL + that, with dg = 1e-5 max|g| of the tensor (float32 accumulation, and the
    # float16 rounding of the per-sentence prompt gradients, where a value straddling a float16
    # midpoint rounds one ulp apart on either side).
    grads = {n: p.grad for n, p in det.named_parameters() if n in after}
    eps, lr, loose = 1e-8, config.lr, 0
    for k in after:
        g = grads[k].abs() if grads[k] is not None else torch.zeros_like(state[k])  # unused: not stepped
        dg = 1e-5 * float(g.max())
        allowed = ATOL + lr * dg * eps / (g + eps) ** 2
        diff = (state[k] - after[k]).abs()
        _report(f"updated {k}", state[k], after[k])
        assert (diff <= allowed).all(), k
        loose += int((diff > ATOL).sum())
    total = sum(v.numel() for v in after.values())
    print(f"adaclip fidelity: {loose} of {total} updated weights beyond {ATOL} (|g| near AdamW's eps)")
    assert loose < 0.01 * total  # the allowance matters only where the gradient nearly vanishes


def test_fixture_through_convert(official):
    """The official trainer's checkpoint (written as a .pth) -> clipad convert -> the same outputs."""
    e = official["expected"]
    pth, out = official["tmp"] / "official.pth", official["tmp"] / "converted.safetensors"
    torch.save({k[len("official/"):]: v for k, v in e.items() if k.startswith("official/")}, pth)
    convert_checkpoint("adaclip", pth, out, backbone="tiny", pretrained=None)
    det = official["detector"](learned=False)
    det.load_learned_state(read_learned_weights(out, "adaclip"))
    x = e["images"][:2].float() / 255
    pred = det.predict(x, class_name="metal_nut")
    assert _report("converted scores", pred.image_scores, torch.cat([e["eval/0/score"], e["eval/1/score"]])) < ATOL
    assert _report("converted maps", pred.anomaly_maps, torch.stack([e["eval/0/map"], e["eval/1/map"]])) < ATOL


# =========================================================================== conversion


def _official_file(seed: int = 0, depth: int = 4, length: int = 5, taps: int = 4, dim: int = 64, width: int = 64,
                   text_width: int = 64) -> dict[str, torch.Tensor]:
    """A random checkpoint in the official layout for a backbone of these widths."""
    from clipad.methods.adaclip.convert import expected_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(depth, length, taps, dim, width, text_width)
    return {f"clip_model.{k}": 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}


def test_convert_round_trip_and_options(tmp_path):
    """An official-layout file for tiny's widths -> convert -> load_detector and checkpoint= give
    what loading the tensors directly gives; the header records the implied options."""
    from safetensors import safe_open

    obj = _official_file(1, taps=4)
    pth = tmp_path / "pretrained_visa_clinicdb.pth"
    torch.save(obj, pth)
    out = convert_checkpoint("adaclip", pth, tmp_path / "out.safetensors", backbone="tiny", pretrained=None)
    with safe_open(str(out), "pt") as f:
        options = json.loads(f.metadata()["options"])
    assert (options["prompt_depth"], options["prompt_length"], options["taps"]) == (4, 5, [0.25, 0.5, 0.75, 1.0])
    direct = tiny_detector("adaclip", image_size=SIZE)
    direct.load_learned_state({k[len("clip_model."):]: v for k, v in obj.items()})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        loaded = clipad.load_detector(out, device="cpu")
    via_option = tiny_detector("adaclip", image_size=SIZE, checkpoint=str(out))
    x = random_images(2, SIZE, seed=3)
    ref = direct.predict(x)
    pred = via_option.predict(x)
    assert torch.equal(pred.image_scores, ref.image_scores) and torch.equal(pred.anomaly_maps, ref.anomaly_maps)
    assert loaded.learned_state().keys() == direct.learned_state().keys()
    assert all(torch.equal(loaded.learned_state()[k], v) for k, v in direct.learned_state().items())
    # two taps and depth 2: implied by the file
    out2 = tmp_path / "o2.safetensors"
    torch.save(_official_file(2, depth=2, length=3, taps=2), pth)
    convert_checkpoint("adaclip", pth, out2, backbone="tiny", pretrained=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        det = clipad.load_detector(out2, device="cpu")
    assert (det.depth, det.length, det.tap_layers) == (2, 3, (2, 4))
    with pytest.raises(ClipadError, match="missing"):  # checkpoint= keeps the given options: a clear misfit
        tiny_detector("adaclip", image_size=SIZE, checkpoint=str(out2))


def test_convert_released_layout():
    """The released ViT-L-14-336 layout (J=4, M=5, 4 taps, widths 1024 / 768) converts to the
    default options, every tensor under its clipad name, float32."""
    from clipad.methods.adaclip.convert import convert_official

    obj = {k: v.half() for k, v in _official_file(0, dim=768, width=1024, text_width=768).items()}
    conv = convert_official(obj)
    assert conv.method == "adaclip" and conv.options == {"prompt_depth": 4, "prompt_length": 5}
    assert conv.image_size == 518 and len(conv.learned) == len(obj) == 8 + 8 + 2 + 10 + 10
    assert conv.learned["patch_token_layer.head.3.weight"].shape == (768, 1024)
    assert conv.learned["dynamic_visual_prompt_generator.head.4.weight"].shape == (1024, 768)
    assert all(v.dtype == torch.float32 for v in conv.learned.values())


class _Payload:
    """Not a tensor: a pickled object must never be loaded."""


@pytest.mark.parametrize("case", ["missing", "extra", "unprefixed", "shape", "pickled", "not-a-dict", "non-tensor"])
def test_convert_rejects_bad_files(tmp_path, case):
    obj: object = _official_file()
    match = {"missing": "missing", "extra": "unexpected", "unprefixed": "unexpected", "shape": "shape",
             "pickled": "never unpickles", "not-a-dict": "not an AdaCLIP", "non-tensor": "not named tensors"}[case]
    if case == "missing":
        del obj["clip_model.dynamic_text_prompt_generator.head.2.bias"]
    elif case == "extra":
        obj["clip_model.patch_token_layer.head.0.scale"] = torch.ones(1)
    elif case == "unprefixed":
        obj["text_prompter.static_prompts.0"] = obj.pop("clip_model.text_prompter.static_prompts.0")
    elif case == "shape":
        obj["clip_model.patch_token_layer.head.1.weight"] = torch.zeros(64, 32)
    elif case == "pickled":
        obj["clip_model.extra"] = _Payload()
    elif case == "not-a-dict":
        obj = [torch.zeros(1)]
    elif case == "non-tensor":
        obj["clip_model.cls_token_layer.head.0.bias"] = 3
    pth = tmp_path / "bad.pth"
    torch.save(obj, pth)
    with pytest.raises(ClipadError, match=match) as info:
        convert_checkpoint("adaclip", pth, tmp_path / "o.safetensors")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_learned_state_errors():
    det = tiny_detector("adaclip", image_size=SIZE)
    state = det.learned_state()
    with pytest.raises(ClipadError, match="missing"):
        det.load_learned_state({k: v for k, v in state.items() if "cls_token" not in k})
    with pytest.raises(ClipadError, match="shape"):
        det.load_learned_state({**state, "visual_prompter.static_prompts.0": torch.zeros(4, 64)})


# =========================================================================== quirks and properties (tiny)


@pytest.fixture(scope="module")
def tiny() -> AdaCLIP:
    det = tiny_detector("adaclip", image_size=SIZE)
    det.reset_parameters(5)
    with torch.no_grad():  # prompts large enough that every path visibly matters
        for prompter in (det.text_prompter, det.visual_prompter):
            for p in prompter.static_prompts:
                p.mul_(25)
    return det


def _clone(det: AdaCLIP, **options) -> AdaCLIP:
    other = tiny_detector("adaclip", image_size=SIZE, **options)
    other.load_learned_state(det.learned_state())
    return other


def test_defaults():
    det = tiny_detector("adaclip")
    assert det.image_size == 512  # 518 is not a multiple of tiny's patch 16
    assert det.tap_layers == (1, 2, 3, 4) and (det.depth, det.length) == (4, 5)
    assert not det.backbone.quick_gelu  # GELU MLPs (config_activation)
    assert AdaCLIP.backbone_options(det.opts) == {"config_activation": True}
    assert AdaCLIP.default_backbone == "ViT-L-14-336" and AdaCLIP.default_pretrained == "openai"
    assert det.training_defaults["optimizer"] == "adamw"
    with pytest.raises(ClipadError, match="prompt_length"):
        tiny_detector("adaclip", prompt_length=0)
    with pytest.raises(ClipadError, match="hsf_alpha"):
        tiny_detector("adaclip", hsf_alpha=1.5)


def test_global_feature_and_scores_without_fusion(tiny):
    """hsf=False: score = softmax(100 g @ T)[abnormal] with g the projected prompted CLS, computed
    here from the method's parts; the fusion changes it; scores are in [0, 1]."""
    x = tiny.backbone.normalize(random_images(2, SIZE, seed=1))
    plain = _clone(tiny, hsf=False)
    with torch.no_grad():
        glob, patches, grid, dyn = plain.encode(x)
        text = plain.text_features(dyn, ["object", "object"])
        ref = torch.softmax(100.0 * torch.einsum("bd,bdc->bc", glob, text), dim=1)[:, 1]
    s_plain, _ = plain.score_normalized(x)
    s_hsf, m_hsf = tiny.score_normalized(x)
    assert (s_plain - ref).abs().max() < 1e-5
    assert not torch.allclose(s_plain, s_hsf)
    assert ((m_hsf >= 0) & (m_hsf <= 1)).all() and ((s_hsf >= 0) & (s_hsf <= 1)).all()


def test_visual_prompts_appended_and_kept(tiny):
    """The image tower gets M tokens appended before block 0 and replaced before blocks 1..J-1;
    from block J on the hook leaves the stream alone, so they stay and keep attending."""
    n = 1 + (SIZE // 16) ** 2
    x = tiny.backbone.normalize(random_images(1, SIZE, seed=2))
    for depth, replaced in ((4, [True] * 4), (2, [True, True, False, False])):
        det = _clone(tiny) if depth == 4 else tiny_detector("adaclip", image_size=SIZE, prompt_depth=2)
        bb, calls = det.backbone, []
        original = bb.encode_image

        def spy(*args, original=original, calls=calls, **kwargs):
            hook = kwargs.get("layer_hook")
            if hook is not None:
                def wrapped(i, h):
                    out = hook(i, h)
                    calls.append((h.shape[1], out is not None, (out if out is not None else h).shape[1]))
                    return out
                kwargs["layer_hook"] = wrapped
            return original(*args, **kwargs)

        bb.encode_image = spy
        try:
            with torch.no_grad():
                det.encode(x)
        finally:
            del bb.encode_image
        assert [c[1] for c in calls] == replaced
        assert [c[0] for c in calls] == [n] + [n + 5] * 3 and all(c[2] == n + 5 for c in calls)


def test_text_prompts_skip_block_zero_and_unused_sets(tiny):
    """Static text prompt 0 is never used (block 0 takes no prompts), set 1 is (tiny's text
    tower has 2 blocks, so sets 2 and 3 are unused too)."""
    x = tiny.backbone.normalize(random_images(1, SIZE, seed=4))
    base, _ = tiny.score_normalized(x)
    for j, changes in ((0, False), (1, True), (2, False), (3, False)):
        other = _clone(tiny)
        with torch.no_grad():
            other.text_prompter.static_prompts[j].add_(1.0)
            s, _ = other.score_normalized(x)
        assert (not torch.equal(s, base)) == changes, j


def _inserted_contexts(det: AdaCLIP, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(visual, text) prompt contexts as the towers receive them: the last M image rows and text
    positions 1..M of every stream a hook returned."""
    bb, m = det.backbone, det.length
    seen: tuple[list, list] = ([], [])
    originals = bb.encode_image, bb.encode_text

    def spy(fn, store, cut):
        def call(*args, **kwargs):
            hook = kwargs.get("layer_hook")
            if hook is not None:
                def wrapped(i, h):
                    out = hook(i, h)
                    if out is not None:
                        store.append(cut(out))
                    return out
                kwargs["layer_hook"] = wrapped
            return fn(*args, **kwargs)
        return call

    bb.encode_image = spy(originals[0], seen[0], lambda h: h[:, -m:])
    bb.encode_text = spy(originals[1], seen[1], lambda h: h[:, 1 : 1 + m])
    try:
        with torch.no_grad():
            det.score_normalized(x)
    finally:
        del bb.encode_image, bb.encode_text
    return seen


def test_prompt_fp16_rounding(tiny):
    """prompt_fp16 (default): every context the towers receive is a float16 value (the official
    ``.half()``); prompt_fp16=False: full precision, and the outputs differ."""
    x = tiny.backbone.normalize(random_images(1, SIZE, seed=5))
    for fp16 in (True, False):
        visual, text = _inserted_contexts(_clone(tiny, prompt_fp16=fp16), x)
        assert len(visual) == 4 and len(text) == 1  # blocks 0..3 of the image tower; block 1 of tiny's 2 text blocks
        exact = all(torch.equal(c, c.half().float()) for c in visual + text)
        assert exact == fp16
    a = _clone(tiny).score_normalized(x)[1]
    b = _clone(tiny, prompt_fp16=False).score_normalized(x)[1]
    assert not torch.equal(a, b)


def test_map_is_official_formula(tiny):
    """sigma=0: the map is softmax(mean over taps of align_corners=True upsampled logits), written
    here directly from the projected features and text."""
    x = tiny.backbone.normalize(random_images(2, SIZE, seed=6))
    raw = _clone(tiny, sigma=0.0)
    with torch.no_grad():
        glob, patches, grid, dyn = raw.encode(x)
        text = raw.text_features(dyn, ["object"] * 2)
        ups = [F.interpolate((100.0 * p @ text).transpose(1, 2).reshape(2, 2, *grid), size=(SIZE, SIZE), mode="bilinear",
                             align_corners=True) for p in patches]
        prob = torch.stack(ups).mean(0).softmax(dim=1)
    _, maps = raw.score_normalized(x)
    assert (maps - prob[:, 1]).abs().max() < 1e-5


def test_scores_independent_of_batch_and_order(tiny):
    """Seeded k-means and per-image text: an image's score does not depend on what it is batched with."""
    x = random_images(3, SIZE, seed=7)
    together = tiny.predict(x, class_name="bottle")
    alone = torch.cat([tiny.predict(x[i : i + 1], class_name="bottle").image_scores for i in range(3)])
    reverse = tiny.predict(x.flip(0), class_name="bottle").image_scores.flip(0)
    assert (together.image_scores - alone).abs().max() < 1e-5
    assert (together.image_scores - reverse).abs().max() < 1e-5
    assert not torch.equal(together.image_scores, tiny.predict(x, class_name="carpet").image_scores)


def test_hsf_against_loop():
    """The fusion against a slow per-cluster loop, with fixed labels."""
    g = torch.Generator().manual_seed(0)
    patches = [F.normalize(torch.randn(2, 30, 8, generator=g), dim=-1) for _ in range(3)]
    logits = [torch.randn(2, 30, 2, generator=g) for _ in range(3)]
    labels = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1])
    out = hybrid_semantic_fusion(patches, logits, n_clusters=2, cluster=lambda d, n: labels)  # k = 10
    for b in range(2):
        prob = torch.stack(logits).mean(0)[b].softmax(-1)[:, 1]
        idx = prob.argsort(descending=True)[:10]
        centres = []
        for c in range(2):
            rows = [p[b, idx[j]] for p in patches for j in range(10) if labels[j] == c]
            centres.append(torch.stack(rows).mean(0))
        ref = F.normalize(torch.stack(centres).mean(0), dim=0)
        assert (out[b] - ref).abs().max() < 1e-6


def test_dice_rows_option(tiny):
    """dice_rows (official: the squeezed batch-1 mask makes each image row a Dice sample) against
    dice per image; the focal terms do not depend on it."""
    x = tiny.backbone.normalize(random_images(1, SIZE, seed=8))
    mask = torch.zeros(1, SIZE, SIZE)
    mask[0, 10:30, 20:40] = 1
    a, b = _clone(tiny), _clone(tiny, dice_rows=False)
    with torch.no_grad():
        _, pa = a.training_loss(x, mask, torch.tensor([1]))
        _, pb = b.training_loss(x, mask, torch.tensor([1]))
    assert pa["focal"] == pytest.approx(float(pb["focal"]), abs=1e-6)
    assert abs(float(pa["dice_abnormal"]) - float(pb["dice_abnormal"])) > 1e-3


def test_gradients_reach_every_trained_module(tiny):
    det = _clone(tiny)
    det.train()
    x = det.backbone.normalize(random_images(1, SIZE, seed=9))
    mask = torch.zeros(1, SIZE, SIZE)
    mask[0, :20, :20] = 1
    loss, _ = det.training_loss(x, mask, torch.tensor([1]), class_names=["bottle"])
    loss.backward()
    for name, p in det.named_parameters():
        if name.startswith("backbone."):
            assert p.grad is None
        elif name.startswith("text_prompter.static_prompts.") and name[-1] in "023":
            assert p.grad is None, name  # set 0 never used; tiny's 2 text blocks leave 2 and 3 unused
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# =========================================================================== training loop


def _train_cli(argv: list[str]) -> int:
    from clipad.cli import build_parser

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return args.func(args)


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_folder_dataset(root, n_normal=2, n_abnormal=2)
    return root


def _args(root: Path, out: Path) -> list[str]:
    return ["train", "--method", "adaclip", "--backbone", "tiny", "--pretrained", "none", "--dataset", "folder",
            "--root", str(root), "--normal-dir", "good", "--abnormal-dir", "bad", "--mask-dir", "masks",
            "--out", str(out), "--image-size", str(SIZE), "--workers", "0", "--quiet"]


def test_train_cli_and_resume(folder_data, tmp_path):
    """``clipad train --method adaclip``: the official recipe (batch 1, AdamW), a detector file at
    the end, and 2 epochs straight == 1 epoch, then resumed, bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train_cli(_args(folder_data, straight) + ["--epochs", "2"]) == 0
    with open(straight / training.LOG_CSV, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 4  # batch 1
    log = json.loads((straight / training.LOG_JSON).read_text())
    assert log["run"]["config"]["optimizer"] == "adamw" and log["run"]["config"]["weight_decay"] == 0.01
    assert _train_cli(_args(folder_data, split) + ["--epochs", "2", "--max-steps", "5"]) == 0
    assert training.last_checkpoint(split)[0] == 1
    assert _train_cli(_args(folder_data, split) + ["--epochs", "2", "--resume"]) == 0
    a = read_learned_weights(straight / "adaclip.safetensors", "adaclip")
    b = read_learned_weights(split / "adaclip.safetensors", "adaclip")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = tiny_detector("adaclip", image_size=SIZE)
    fresh.reset_parameters(111)
    assert any(not torch.equal(a[k], v) for k, v in fresh.learned_state().items())


def test_duplicate_patches_give_finite_fusion(tiny):
    """Fewer distinct patches than clusters (a blank image): sklearn leaves clusters empty; they are
    skipped (the official mean over them is NaN) and no sklearn warning escapes."""
    from clipad.methods.adaclip.model import kmeans_labels

    patches = [F.normalize(torch.ones(1, 12, 8), dim=-1) for _ in range(2)]
    logits = [torch.zeros(1, 12, 2) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hybrid_semantic_fusion(patches, logits, 4, lambda d, n: kmeans_labels(d, n, 0))
        pred = tiny.predict(torch.full((1, 3, SIZE, SIZE), 0.5))
    assert torch.allclose(out, patches[0][:, 0], atol=1e-6)
    assert torch.isfinite(pred.image_scores).all() and torch.isfinite(pred.anomaly_maps).all()
