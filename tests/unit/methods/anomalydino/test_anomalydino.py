"""AnomalyDINO against the official code, and its properties.

Fixture ``tests/fixtures/anomalydino/`` made by ``tools/anomalydino_fixtures.py`` running the
official ``run_anomaly_detection`` of dammsi/AnomalyDINO @ b3435f0 (faiss on the CPU, NumPy reseeded
before each PCA mask) with a small random DINOv2 (official ``DinoVisionTransformer``, patch 14,
native grid 16 x 16) at ``--resolution 196`` on generated 196 x 230 PNGs (top-left crop to 196 x 224,
grid 14 x 16, positional embedding resized with the +0.1 offset): 1 and 4 shots, with the
agnostic hazelnut setting (masking and rotation on) and with both off. Expected: patch maps,
image scores, full-resolution maps (after the blur at the original size), the official masks,
and cv2 rotations of a small noise image.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clipad
from clipad import ClipadError
from clipad.backbones.dinov2 import DinoV2Config, create_dinov2_backbone
from clipad.data.transforms import resize_batch
from clipad.methods.anomalydino import AnomalyDINO, AnomalyDINOOptions
from clipad.methods.anomalydino.masking import foreground_mask, grid_close, raster_close
from clipad.methods.anomalydino.model import OFFICIAL_COMMIT, category_settings, top_percent_score
from clipad.methods.anomalydino.rotation import ANGLES, rotate_uint8

from _helpers import FIXTURES_DIR, report_max_diff, tiny_detector

FIX = FIXTURES_DIR / "anomalydino"
TOL = 1e-5  # the fidelity bar (fp32, CPU)
pytestmark = pytest.mark.usefixtures("one_thread")
OUTPUT_PREFIXES = ("on.", "off.", "mask.", "rotation.")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    with safe_open(str(FIX / "expected.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["official_commit"] == OFFICIAL_COMMIT
    tensors = load_file(str(FIX / "expected.safetensors"))
    weights = {k: v for k, v in tensors.items() if not k.startswith(OUTPUT_PREFIXES)}
    path = tmp_path_factory.mktemp("adino") / "official.safetensors"
    save_file(weights, str(path))  # official state-dict layout, through clipad's file loading
    shape = json.loads(meta["shape"])
    cfg = DinoV2Config(width=shape["width"], depth=shape["depth"], heads=shape["heads"], patch_size=shape["patch_size"],
                       img_size=shape["img_size"])
    backbone = create_dinov2_backbone("fixture", pretrained=path, config=cfg)
    return backbone, int(meta["resolution"]), tensors


def _detector(fixture, **options) -> AnomalyDINO:
    backbone, resolution, _ = fixture
    return AnomalyDINO(backbone, AnomalyDINOOptions(image_size=resolution, precision="fp32", **options))


TESTS = ["test_crack_000.png", "test_good_000.png", "test_good_001.png"]
REFS = [f"train_good_{i:03d}.png" for i in range(4)]


def _model_input(det: AnomalyDINO, paths: list[Path]) -> torch.Tensor:
    from clipad.data.transforms import as_image_list

    tensors = as_image_list(paths)
    return det.backbone.normalize(resize_batch(tensors, det.input_size(tuple(tensors[0].shape[-2:])), det.device))


@pytest.mark.parametrize("shots", [1, 4])
@pytest.mark.parametrize("setting", ["on", "off"])
def test_matches_official(fixture, setting, shots):
    _, _, expected = fixture
    key = f"{setting}.{shots}shot"
    det = _detector(fixture) if setting == "on" else _detector(fixture, masking=False, rotation=False)
    assert det.masking_for("hazelnut") == (setting == "on") and det.rotation_for("hazelnut") == (setting == "on")
    det.set_reference([FIX / "images" / r for r in REFS[:shots]], class_name="hazelnut")
    tests = [FIX / "images" / t for t in TESTS]
    scores, patch_maps = det.score_normalized(_model_input(det, tests), "hazelnut", finish=False)
    pred = det.predict(tests, class_name="hazelnut")
    for i in range(3):
        exp = expected[f"{key}.patch_map.{i}"]
        assert report_max_diff("anomalydino", f"{key} patch map {i}", patch_maps[i].double(), exp) <= TOL
        exp_score = expected[f"{key}.score.{i}"].reshape(1)
        assert report_max_diff("anomalydino", f"{key} score {i}", pred.image_scores[i:i + 1].double(), exp_score) <= TOL
        if f"{key}.full_map.{i}" in expected:
            full = expected[f"{key}.full_map.{i}"]
            assert report_max_diff("anomalydino", f"{key} full map {i}", pred.anomaly_maps[i], full) <= TOL
    if setting == "on":  # the masked patches are those of the official masks
        for i in range(3):
            assert torch.equal(patch_maps[i].flatten() != 0, expected[f"mask.{i}"])


def test_masks_match_official(fixture):
    det = _detector(fixture)
    x = _model_input(det, [FIX / "images" / t for t in TESTS])
    tokens, grid = det.patch_features(x)
    ours = foreground_mask(tokens, grid)
    _, _, expected = fixture
    for i in range(3):
        assert torch.equal(ours[i], expected[f"mask.{i}"])
        assert 0 < int(ours[i].sum()) < ours.shape[1]  # a real mask: some patches kept, some not


def test_rotation_matches_cv2(fixture):
    """cv2.warpAffine about (W/2, H/2), reflect-101, uint8 (the official rotate_image), pixel for
    pixel at every angle, on a 20 x 24 noise image (24 = one AVX2 vector step + 8 scalar columns)."""
    _, _, expected = fixture
    img = expected["rotation.input"].permute(2, 0, 1)[None]
    for angle in ANGLES:
        ours = rotate_uint8(img, angle)[0].permute(1, 2, 0)
        assert torch.equal(ours, expected[f"rotation.{angle}"]), angle


def test_rotation_quirk_shifted_rot90():
    """Quirk 1: about (W/2, H/2), 90 degrees is rot90 shifted by one row (the first row reflected)."""
    img = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = rotate_uint8(img, 90)[0]
    r90 = torch.rot90(img[0], 1, dims=(1, 2))
    assert not torch.equal(out, r90)
    assert torch.equal(r90[:, :-1], out[:, 1:])


# --------------------------------------------------------------------------- properties


def _slow_knn(query: torch.Tensor, memory: torch.Tensor, k: int) -> torch.Tensor:
    """[N, D], [M, D] -> [N] float64 mean of the k smallest 1 - cos, one patch at a time."""
    out = []
    for q in query.double():
        cos = torch.stack([F.cosine_similarity(q, m.double(), dim=0) for m in memory])
        out.append((1 - cos).sort().values[:k].mean())
    return torch.stack(out)


@pytest.mark.parametrize("k", [1, 3])
def test_masking_off_equals_slow_knn(k):
    det = tiny_detector("anomalydino", image_size=64, masking=False, rotation=False, k_neighbors=k, precision="fp32")
    refs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    det.set_reference(refs)
    pred = det.predict(x, calibrated=False)
    bb = det.backbone
    with torch.no_grad():
        mem = bb.encode_image(bb.normalize(refs)).tokens.reshape(-1, bb.width)
        tok = bb.encode_image(bb.normalize(x)).tokens
    for i in range(2):
        dist = _slow_knn(tok[i], mem, k)
        n = dist.numel()
        top = dist.sort(descending=True).values[: max(1, int(0.01 * n))].mean()
        assert abs(float(pred.image_scores[i]) - float(top)) <= 1e-5
    # the same through a tiny distance block (memory bounded by memory_chunk)
    small = tiny_detector("anomalydino", image_size=64, masking=False, rotation=False, k_neighbors=k, precision="fp32",
                          memory_chunk=7)
    small.set_reference(refs)
    torch.testing.assert_close(small.predict(x, calibrated=False).image_scores, pred.image_scores, rtol=0, atol=1e-6)


def test_identical_reference_scores_zero():
    det = tiny_detector("anomalydino", image_size=64, masking=False, rotation=False)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    det.set_reference(x)
    pred = det.predict(x)
    assert float(pred.image_scores[0]) < 1e-5 and float(pred.anomaly_maps.abs().max()) < 1e-5
    other = det.predict(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    assert float(other.image_scores[0]) > 1e-3


def test_reference_order_does_not_matter():
    det = tiny_detector("anomalydino", image_size=64)
    refs = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    det.set_reference(refs)
    a = det.predict(x)
    det.set_reference(refs[[2, 0, 1]])
    b = det.predict(x)
    torch.testing.assert_close(a.image_scores, b.image_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.anomaly_maps, b.anomaly_maps, rtol=0, atol=1e-6)
    assert det.shots == 3 and det._references[""]["patches"].shape[0] == 3 * 8 * 16  # 8 rotations each


def test_top_percent_score_counts_masked_zeros():
    d = torch.zeros(1, 300)
    d[0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert float(top_percent_score(d)) == pytest.approx(4.0)  # int(0.01 * 300) = 3 -> mean(5, 4, 3)
    assert float(top_percent_score(d[:, :99])) == pytest.approx(5.0)  # 0 values -> the max


def test_raster_morphology_wraps_rows():
    """The official dilation/closing on the (N, 1) column: neighbours are i - 1 and i + 1 in raster
    order, wrapping across grid rows and ignoring the row above and below."""
    grid = (3, 4)
    m = torch.zeros(1, 12, dtype=torch.bool)
    m[0, 3] = True  # last patch of row 0
    out = raster_close(m)
    assert out[0].nonzero().flatten().tolist() == [2, 3, 4]  # row 1 starts at 4: wrapped
    g = grid_close(m, grid)
    assert g.view(grid)[1, 2:].all() and not g.view(grid)[1, 0]  # on the grid: vertical, not wrapped
    # closing's erosion treats the outside as set: the last index stays on
    m2 = torch.zeros(1, 6, dtype=torch.bool)
    m2[0, 5] = True
    assert raster_close(m2)[0].tolist() == [False, False, False, False, True, True]


def test_category_table():
    assert category_settings("hazelnut", "agnostic") == (True, True)
    assert category_settings("Metal Nut", "agnostic") == (False, True)
    assert category_settings("screw", "informed") == (True, True)
    assert category_settings("bottle", "informed") == (False, False)
    assert category_settings("pcb1", "agnostic") == (True, True)
    assert category_settings("pcb1", "informed") == (True, False)
    assert category_settings("capsule", "masking_only") == (True, False)
    assert category_settings("capsule", "agnostic_no_mask") == (False, True)
    assert category_settings("my_part", "agnostic") == (False, True)


def test_aspect_resize_and_crop():
    det = tiny_detector("anomalydino", image_size=64)
    assert det.input_size((80, 56)) == (91, 64)  # smaller edge 64, long edge int(64 * 80 / 56)
    assert det.input_size((64, 100)) == (64, 100)
    det.set_reference(torch.rand(1, 3, 64, 100))
    x = det.backbone.normalize(torch.rand(1, 3, 64, 100))
    _, maps = det.score_normalized(x, finish=False)
    assert maps.shape == (1, 4, 6)  # top-left crop 64 x 96 of patch 16
    assert det.predict(torch.rand(1, 3, 64, 100)).anomaly_maps.shape == (1, 64, 100)


def test_needs_references_and_dinov2_backbone():
    det = tiny_detector("anomalydino", image_size=64)
    assert det.backbone.name == "tiny-dinov2"
    with pytest.raises(ClipadError, match="set_reference"):
        det.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(ClipadError, match="DINOv2"):
        clipad.create_detector("anomalydino", backbone="ViT-B-16", pretrained=None, device="cpu")
    with pytest.raises(ClipadError, match="text tower"):
        det.backbone.tokenize(["a photo"])


def test_save_load_round_trip(tmp_path):
    det = tiny_detector("anomalydino", image_size=64, seed=4)
    det.set_reference(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7)), class_name="hazelnut")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        loaded = clipad.load_detector(det.save(tmp_path / "d.safetensors"), device="cpu")
    assert loaded.backbone.name == "tiny-dinov2" and loaded.options == det.options
    a, b = det.predict(x, class_name="hazelnut"), loaded.predict(x, class_name="hazelnut")
    assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)
