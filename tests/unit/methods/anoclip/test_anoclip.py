"""AnoCLIP: fidelity to the official code (fixtures) and properties on the tiny backbone.

The fixtures in ``tests/fixtures/anoclip/`` were computed by the official AnoVL code (commit
3a70bfd) on a 14-block random CLIP by ``tools/anoclip_fixtures.py``: encoder outputs, prompt
embeddings, and whole runs of its MVTec AD script (22-view image scores, maps without and with
test-time adaptation) and VisA script (tiling, linear adapter).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import clipad
from _helpers import FIXTURES_DIR, random_images, report_max_diff, tiny_detector
from clipad import ClipadError
from clipad.backbones.clip import OPENAI_MEAN, OPENAI_STD, Backbone
from clipad.backbones.dualpath import encode_image_dualpath, first_block_of_last
from clipad.methods.anoclip.model import AnoCLIP, augmented_views, stitch_tiles, tile_offsets
from clipad.methods.anoclip.prompts import ABNORMAL_STATES, NORMAL_STATES, prompt_class_name, resolve_domain, state_sentences, templates_for

FIXTURES = FIXTURES_DIR / "anoclip"
ATOL = 1e-4
SIZE = 64  # tiny at 64 px: a 4x4 patch grid keeps property tests fast


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**options) -> AnoCLIP:
    return tiny_detector("anoclip", **options)


def _images(n: int, h: int = SIZE, w: int = SIZE, seed: int = 0) -> torch.Tensor:
    return random_images(n, h, w, seed)


def _report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return report_max_diff("anoclip", name, ours, theirs)


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def official():
    if not (FIXTURES / "model.safetensors").is_file() or not (FIXTURES / "expected.safetensors").is_file():
        pytest.skip(f"AnoCLIP fixtures missing in {FIXTURES}: build them with tools/anoclip_fixtures.py (tools/README.md)")
    import open_clip
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(FIXTURES / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    weights = load_file(str(FIXTURES / "model.safetensors"))
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    cfg = json.loads(meta["config"])
    with torch.random.fork_rng(devices=[]):
        model = open_clip.model.CLIP(**cfg)
    ids, rows = weights.pop("token_ids"), weights.pop("token_rows")
    # rows of tokens no prompt uses were zero in the official run and cannot affect any output
    table = torch.zeros(cfg["text_cfg"]["vocab_size"], cfg["text_cfg"]["width"])
    table[ids] = rows
    weights["token_embedding.weight"] = table
    model.load_state_dict(weights, strict=True)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    backbone = Backbone(
        model, name="anoclip-fixture", pretrained=None, mean=OPENAI_MEAN, std=OPENAI_STD, tokenizer=tokenizer
    )
    text_cache: dict = {}

    def detector(**options) -> AnoCLIP:
        det = AnoCLIP(backbone, image_size=cfg["vision_cfg"]["image_size"], precision="fp32", **options).eval()
        det._text_cache = text_cache  # one prompt encoding per class for all detectors of this module
        return det

    return {"meta": meta, "expected": expected, "backbone": backbone, "detector": detector}


def _mvtec_run(official, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The official MVTec AD script's run: classes in order, their images in order."""
    e, meta = official["expected"], official["meta"]
    images = e["mvtec_images"].float() / 255
    det = official["detector"](**options)
    if options.get("official_compat"):
        det.tta_rng.set_state(e["mvtec/tta/rng_state"])
    scores, maps = [], []
    for i, cls in enumerate(json.loads(meta["mvtec_classes"])):
        pred = det.predict(images[2 * i : 2 * i + 2], class_name=cls)
        scores.append(pred.image_scores)
        maps.append(pred.anomaly_maps)
    return torch.cat(scores), torch.cat(maps)


def test_fixture_vv_tokens_and_cls(official):
    e, bb = official["expected"], official["backbone"]
    assert bb.depth == 14  # the official surgery turns blocks 3..14 into dual-path blocks
    x = bb.normalize(e["mvtec_images"].float() / 255)
    with torch.no_grad():
        feats = encode_image_dualpath(bb, x, first_block_of_last(bb.depth, 12))
        local = bb.project(feats.vv_tokens)
    assert _report("CLS embedding", feats.cls, e["cls"]) < ATOL
    assert _report("V-V local tokens", local, e["vv_tokens"]) < ATOL
    assert (local - e["cls"][:, None]).abs().max() > 1e-2  # local tokens are not the CLS path


def test_fixture_prompt_embeddings(official):
    e, meta = official["expected"], official["meta"]
    det = official["detector"]()
    for cls in json.loads(meta["prompt_classes"]):
        means, _ = det.text_features(cls)
        assert _report(f"class embeddings '{cls}'", means, e[f"text/{cls}"]) < ATOL
    _, rows = det.text_features("bottle")
    assert _report("adapter prompt matrix 'bottle'", rows, e["text_rows/bottle"]) < ATOL
    # texture and object prompts differ (carpet is a texture class)
    assert (e["text/carpet"] - e["text/bottle"]).abs().max() > 1e-3


def test_fixture_mvtec_scores_and_maps_without_tta(official):
    e, stride = official["expected"], int(official["meta"]["map_stride"])
    scores, maps = _mvtec_run(official)
    assert _report("22-view image scores", scores, e["mvtec/plain/scores"]) < ATOL
    assert _report("maps without TTA", maps[:, ::stride, ::stride], e["mvtec/plain/maps"]) < ATOL
    assert _report("map 0, every pixel", maps[0], e["mvtec/plain/map0_full"]) < ATOL
    assert e["mvtec/plain/maps"].std() > 1e-3  # the maps carry structure: agreement is not trivial


def test_fixture_mvtec_maps_after_tta_compat(official):
    e, stride = official["expected"], int(official["meta"]["map_stride"])
    scores, maps = _mvtec_run(official, tta=True, official_compat=True)
    assert _report("maps after TTA (compat)", maps[:, ::stride, ::stride], e["mvtec/tta/maps"]) < ATOL
    assert _report("image scores with TTA", scores, e["mvtec/tta/scores"]) < ATOL
    # TTA moved the maps far more than the tolerance, so the agreement above is about TTA
    assert (e["mvtec/tta/maps"] - e["mvtec/plain/maps"]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_fixture_visa_tiles_and_linear_adapter(official, tta):
    e, stride = official["expected"], int(official["meta"]["map_stride"])
    det = official["detector"](adapter="linear", augment_views=False, tta=tta, official_compat=tta)
    tag = "tta" if tta else "plain"
    if tta:
        det.tta_rng.set_state(e["visa/tta/rng_state"])
    images = e["visa_images"].float() / 255  # 240 x 320: two overlapping 240 x 240 tiles
    pred = det.predict(images, class_name=official["meta"]["visa_class"])
    assert pred.anomaly_maps.shape == (2, 240, 320)
    assert _report(f"VisA image scores ({tag})", pred.image_scores, e[f"visa/{tag}/scores"]) < ATOL
    assert _report(f"VisA maps ({tag})", pred.anomaly_maps[:, ::stride, ::stride], e[f"visa/{tag}/maps"]) < ATOL


# =========================================================================== dual path


@pytest.fixture(scope="module")
def tiny() -> AnoCLIP:
    return _tiny(image_size=SIZE)


def test_dual_path_without_vv_blocks_is_vanilla(tiny):
    bb = tiny.backbone
    x = bb.normalize(_images(2))
    with torch.no_grad():
        vanilla = bb.encode_image(x)
        none = encode_image_dualpath(bb, x, bb.depth + 1)
        full = encode_image_dualpath(bb, x, 1)
    assert torch.equal(none.cls, vanilla.cls)
    assert torch.equal(bb.visual.ln_post(none.vv_tokens), vanilla.tokens)
    assert torch.equal(none.vv_tokens, none.orig_tokens)
    # the original path of a dual pass is vanilla CLIP (fused attention: ~1e-6)
    torch.testing.assert_close(full.cls, vanilla.cls, rtol=0, atol=1e-5)
    torch.testing.assert_close(bb.visual.ln_post(full.orig_tokens), vanilla.tokens, rtol=0, atol=1e-5)
    assert (full.vv_tokens - full.orig_tokens).abs().max() > 1e-2
    assert none.grid == full.grid == (SIZE // 16, SIZE // 16)


def test_dual_path_taps_are_the_state_after_each_block(tiny):
    """Taps are separate tensors holding the state after their block (no aliasing): each equals
    the final state of the same tower cut after that block."""
    bb = tiny.backbone
    x = bb.normalize(_images(2, seed=1))
    layers = list(range(1, bb.depth + 1))
    with torch.no_grad():
        feats = encode_image_dualpath(bb, x, 2, vv_taps=layers, orig_taps=layers)
        for layer in layers:
            cut = copy.deepcopy(bb)
            cut.visual.transformer.resblocks = cut.visual.transformer.resblocks[:layer]
            ref = encode_image_dualpath(cut, x, 2)
            torch.testing.assert_close(feats.vv_taps[layer][:, 1:], ref.vv_tokens, rtol=0, atol=1e-6)
            torch.testing.assert_close(feats.orig_taps[layer][:, 1:], ref.orig_tokens, rtol=0, atol=1e-6)
    assert not torch.equal(feats.vv_taps[2], feats.vv_taps[bb.depth])
    assert feats.vv_taps[2].data_ptr() != feats.vv_taps[bb.depth].data_ptr()


def test_dual_path_block_count_option():
    det = _tiny(image_size=SIZE, dual_path_blocks=12)
    assert det.first_vv_block == 1  # "last 12" clipped to tiny's 4 blocks
    assert _tiny(image_size=SIZE, dual_path_blocks=1).first_vv_block == det.backbone.depth
    assert _tiny(image_size=SIZE, dual_path_blocks=0).first_vv_block == det.backbone.depth + 1


# =========================================================================== scoring


def test_shapes_and_ranges(tiny):
    pred = tiny.predict(_images(3), class_name="bottle")
    assert pred.image_scores.shape == (3,) and pred.anomaly_maps.shape == (3, SIZE, SIZE)
    assert ((pred.image_scores > 0) & (pred.image_scores < 1)).all()
    assert ((pred.anomaly_maps > 0) & (pred.anomaly_maps < 1)).all()


def test_views_are_the_official_22():
    x = _images(2, 32, 32, seed=2)
    views = augmented_views(x)
    assert views.shape == (2, 21, 3, 32, 32)
    torch.testing.assert_close(views[:, 16], x.flip(-1))
    torch.testing.assert_close(views[:, 17, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    torch.testing.assert_close(views[:, 19], x.flip(-1).flip(-2))  # rot90 twice
    # an integer-pixel translation by 0.1 of the normalised range [-1, 1] on 21 px = 1 px shift
    x21 = _images(1, 21, 21, seed=3)
    shifted = augmented_views(x21)[0, 12]  # (0.1, 0.1): samples at +1 px in x and y
    torch.testing.assert_close(shifted[:, :-1, :-1], x21[0, :, 1:, 1:], rtol=0, atol=1e-5)


def test_augment_views_option_changes_only_scores(tiny):
    x = _images(2, seed=4)
    plain = _tiny(image_size=SIZE, augment_views=False).predict(x)
    views = tiny.predict(x)
    assert torch.equal(plain.anomaly_maps, views.anomaly_maps)
    assert not torch.equal(plain.image_scores, views.image_scores)


def test_tiling_of_non_square_inputs(tiny):
    """A 64 x 96 input is two 64 x 64 tiles at columns 0 and 32: the left-only part of the map is
    the left tile's own map, the overlap the mean of both, the score the mean of the tiles'."""
    x = _images(1, SIZE, 96, seed=5)
    det = _tiny(image_size=SIZE, augment_views=False)
    pred = det.predict(x)
    assert pred.anomaly_maps.shape == (1, SIZE, 96)
    left, right = det.predict(x[..., :SIZE]), det.predict(x[..., 32:])
    m = pred.anomaly_maps[0]
    # tiles batched or alone: the matmuls may sum in another order (1.2e-7 seen with other CPU
    # kernels): the suite's 1e-5 for maps and scores
    torch.testing.assert_close(m[:, :32], left.anomaly_maps[0, :, :32], rtol=0, atol=1e-5)
    torch.testing.assert_close(m[:, 64:], right.anomaly_maps[0, :, 32:], rtol=0, atol=1e-5)
    overlap = (left.anomaly_maps[0, :, 32:] + right.anomaly_maps[0, :, :32]) / 2
    torch.testing.assert_close(m[:, 32:64], overlap, rtol=0, atol=1e-5)
    torch.testing.assert_close(pred.image_scores, (left.image_scores + right.image_scores) / 2, rtol=0, atol=1e-5)
    # tall inputs tile along the height; other sizes come back at their own size
    assert det.predict(_images(1, 100, 70, seed=6)).anomaly_maps.shape == (1, 100, 70)
    squashed = _tiny(image_size=SIZE, augment_views=False, tile_non_square=False).predict(x)
    assert squashed.anomaly_maps.shape == (1, SIZE, 96) and not torch.allclose(squashed.anomaly_maps, pred.anomaly_maps)


def test_tile_layout_helpers():
    assert tile_offsets(64, 64) == [0]
    assert tile_offsets(390, 240) == [0, 150]  # a VisA image after the shorter-side resize
    assert tile_offsets(500, 240) == [0, 130, 260]  # aspect >= 2: evenly spread, full cover
    tiles = torch.ones(1, 3, 1, 4, 4) * torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1, 1)
    out = stitch_tiles(tiles, [0, 2, 4], -1, (4, 8))
    assert out[0, 0, 0].tolist() == [1, 1, 1.5, 1.5, 3, 3, 4, 4]


# =========================================================================== prompts


def test_prompt_sentences_follow_the_code():
    objects = templates_for(("industrial photo", "industrial image", "manufacturing image"))
    assert len(objects) == 66
    sentences = state_sentences("bottle", NORMAL_STATES, objects)
    assert len(sentences) == 462
    assert sentences[0] == "a cropped industrial photo of the normal bottle"
    assert sentences[7 * 12] == "an industrial photo of a normal bottle"  # template-major
    assert sentences[7 * 12 + 4] == "an industrial photo of a bottle without flaw"
    assert sentences[-1] == "a manufacturing image of a bottle without damage for anomaly detection"
    assert state_sentences("x", ABNORMAL_STATES, objects)[1] == "a cropped industrial photo of the abnormal x"
    textures = templates_for(("industrial photo", "textural photo", "surface picture"))
    assert "a surface picture of the large {}" in textures and "a textural photo of a {}" in textures
    assert prompt_class_name("macaroni2") == "macaroni"
    assert prompt_class_name("metal_nut") == "metal_nut"
    assert prompt_class_name("metal_nut", spaces=True) == "metal nut"


def test_domain_auto_selection_and_override(tiny):
    assert resolve_domain("carpet") == resolve_domain("wood") == "texture"
    assert resolve_domain("bottle") == resolve_domain("pcb1") == "object"
    assert resolve_domain("carpet", "object") == "object"
    carpet_auto, _ = tiny.text_features("carpet")
    forced_texture, _ = _tiny(image_size=SIZE, domain="texture").text_features("carpet")
    forced_object, _ = _tiny(image_size=SIZE, domain="object").text_features("carpet")
    assert torch.equal(carpet_auto, forced_texture)
    assert not torch.allclose(carpet_auto, forced_object)


def test_medical_domain_and_custom_phrases(tiny):
    medical = _tiny(image_size=SIZE, domain="medical")
    assert medical.prompt_phrases("brain") == ("medical image", "medical scan", "clinical photo")
    assert not torch.allclose(medical.text_features("brain")[0], tiny.text_features("brain")[0])
    custom = _tiny(image_size=SIZE, domain_phrases=["x-ray image"])
    means, rows = custom.text_features("chest")
    assert means.shape == (2, 64) and rows.shape == (2 * 22 * 7, 64)


def test_class_name_spaces_option(tiny):
    spaced = _tiny(image_size=SIZE, class_name_spaces=True)
    assert torch.equal(spaced.text_features("metal_nut")[0], tiny.text_features("metal nut")[0])
    assert not torch.equal(tiny.text_features("metal_nut")[0], tiny.text_features("metal nut")[0])


# =========================================================================== TTA


@pytest.mark.parametrize("adapter", ["text", "linear"])
def test_tta_batched_equals_one_at_a_time(adapter):
    det = _tiny(image_size=SIZE, tta=True, adapter=adapter)
    x = _images(3, seed=7)
    batched = det.predict(x, batch_size=3)
    single = [det.predict(x[i : i + 1]) for i in range(3)]
    reordered = det.predict(x[[2, 0, 1]])
    for i in range(3):
        torch.testing.assert_close(batched.anomaly_maps[i], single[i].anomaly_maps[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(reordered.anomaly_maps, batched.anomaly_maps[[2, 0, 1]], rtol=0, atol=1e-5)
    plain = _tiny(image_size=SIZE, adapter=adapter).predict(x)
    assert (plain.anomaly_maps - batched.anomaly_maps).abs().max() > 1e-4  # TTA changed the maps
    assert torch.equal(plain.image_scores, batched.image_scores)  # and never the image scores


def test_tta_on_tiled_inputs_batched_equals_one_at_a_time():
    det = _tiny(image_size=SIZE, tta=True, adapter="linear", augment_views=False)
    x = _images(2, SIZE, 96, seed=8)
    batched = det.predict(x)
    for i in range(2):
        alone = det.predict(x[i : i + 1]).anomaly_maps[0]
        torch.testing.assert_close(batched.anomaly_maps[i], alone, rtol=0, atol=1e-5)


def test_compat_mode_depends_on_order_and_state():
    """official_compat keeps AdamW state and the random stream across images (documented)."""
    det = _tiny(image_size=SIZE, tta=True, official_compat=True)
    x = _images(2, seed=9)
    first = det.predict(x)
    again = det.predict(x)  # the state carried over: not the same maps
    assert (first.anomaly_maps - again.anomaly_maps).abs().max() > 1e-6
    det.reset_tta_state()
    torch.testing.assert_close(det.predict(x).anomaly_maps, first.anomaly_maps, rtol=0, atol=1e-6)
    det.reset_tta_state()
    swapped = det.predict(x[[1, 0]])
    assert (swapped.anomaly_maps[1] - first.anomaly_maps[0]).abs().max() > 1e-6
    # the AdamW state is per class: a first image of another class starts a fresh optimiser
    assert set(det._compat_adapters) == {"object"}


def test_tta_steps_zero_is_an_untrained_adapter():
    x = _images(1, seed=10)
    zero = _tiny(image_size=SIZE, tta=True, tta_steps=0).predict(x)
    five = _tiny(image_size=SIZE, tta=True).predict(x)
    assert (zero.anomaly_maps - five.anomaly_maps).abs().max() > 1e-6


# =========================================================================== options


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"adapter": "mlp"}, "adapter"),
        ({"domain": "food"}, "domain"),
        ({"dual_path_blocks": -1}, "dual_path_blocks"),
        ({"tta_steps": -2}, "tta_steps"),
        ({"tta_lr": "fast"}, "tta_lr"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"domain_phrases": []}, "domain_phrases"),
        ({"domain_phrases": "x-ray"}, "domain_phrases"),
        ({"view_chunk": 0}, "view_chunk"),
    ],
)
def test_bad_options_name_the_option(options, name):
    with pytest.raises(ClipadError, match=name):
        _tiny(image_size=SIZE, **options)


def test_save_load_keeps_anoclip_options(tmp_path):
    det = _tiny(image_size=SIZE, tta=True, adapter="linear", domain="medical", domain_phrases=["x-ray image"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        loaded = clipad.load_detector(det.save(tmp_path / "a.safetensors"), device="cpu")
    assert loaded.options == det.options
    assert loaded.adapter == "linear" and loaded.domain_phrases == ("x-ray image",) and loaded.tta
    x = _images(1, seed=11)
    assert torch.equal(det.predict(x).anomaly_maps, loaded.predict(x).anomaly_maps)
