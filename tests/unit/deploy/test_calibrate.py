"""Calibrated pass/fail decisions (``clipad.deploy.calibrate``, ``clipad calibrate``).

The statistics are checked on synthetic scores, where the achieved false-positive rate is known
exactly (uniform scores: FPR = 1 - threshold), over thousands of calibrations; then once end to
end on generated images with the tiny random backbone. F1-max thresholds are checked against a
slow explicit search; files, predict, the CLI and serve against each other.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import FIXTURES_DIR, tiny_detector, write_folder_dataset
from PIL import Image
from scipy import stats

import clipad
from clipad.checkpoint import read_header
from clipad.cli import main
from clipad.data import folder_dataset
from clipad.data.images import load_image, load_mask
from clipad.data.synthetic import synthetic_set
from clipad.data.transforms import pil_to_tensor, resize_batch
from clipad.deploy.calibrate import (
    NormalCalibrator,
    TopValues,
    calibrate,
    conformal_rank,
    conformal_threshold,
    fpr_upper_bound,
    images_needed,
    min_images,
)
from clipad.errors import CheckpointError, ClipadWarning, InvalidValueError
from clipad.eval.metrics import f1_max_threshold
from clipad.methods.base import Thresholds, normalize_min_max

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- the statistics


def test_order_statistic_and_fewest_images():
    assert [min_images(a) for a in (0.01, 0.05, 0.1, 0.3)] == [99, 19, 9, 3]
    for a in (0.01, 0.05, 0.1, 0.3, 0.07):
        for n in range(1, 400):
            k = conformal_rank(n, a)
            assert k == math.ceil(round((n + 1) * (1 - a), 9))  # exact, no float drift at integers
            assert (k <= n) == (n >= min_images(a)), (a, n)
    with pytest.raises(InvalidValueError, match="at least 99 normal images"):
        conformal_threshold(torch.rand(98), 0.01)


def test_achieved_fpr_follows_the_conformal_beta_law():
    """n = 300 uniform calibration scores, 4000 times: the FPR on new normal images is exactly
    1 - threshold; it must be Beta(n + 1 - k, k) distributed, its mean at most the target, and
    above the reported 95% bound in 5% of calibrations. An off-by-one order statistic (k - 1)
    moves the mean by a third of the target and fails every check."""
    n, a, reps = 300, 0.01, 4000
    g = torch.Generator().manual_seed(0)
    achieved = np.array([1.0 - conformal_threshold(torch.rand(n, generator=g), a) for _ in range(reps)])
    k = conformal_rank(n, a)
    l = n + 1 - k
    assert (k, l) == (298, 3)
    law = stats.beta(l, k)
    se = law.std() / math.sqrt(reps)
    assert achieved.mean() <= a + 4 * se and abs(achieved.mean() - law.mean()) < 4 * se
    assert stats.kstest(achieved, law.cdf).pvalue > 1e-3
    bound = fpr_upper_bound(n, a)
    above = float((achieved > bound).mean())
    assert abs(above - 0.05) < 4 * math.sqrt(0.05 * 0.95 / reps), above
    print(f"FPR target {a}: mean achieved {achieved.mean():.5f} (law {law.mean():.5f}), "
          f"95% bound {bound:.4f} exceeded in {above:.3%} of {reps} calibrations")


def test_ties_never_push_the_fpr_over_the_target():
    """Discrete scores: the rule score >= threshold must mean score > s_(k). With ten equally
    likely values the 3 largest of 300 are all 9; ">= 9" would flag 10% of normal images."""
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        cal = torch.randint(0, 10, (300,), generator=g).float()
        t = conformal_threshold(cal, 0.01)
        new = torch.randint(0, 10, (100_000,), generator=g).float()
        assert float((new >= t).float().mean()) <= 0.01
    same = torch.full((200,), 0.5)
    t = conformal_threshold(same, 0.01)
    assert t > 0.5 and not bool(torch.tensor([0.5]) >= t) and t == float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))


def test_images_needed_is_the_first_n_that_keeps_the_bound_within_twice_the_target():
    assert images_needed(0.01) == 313
    bounds = {n: fpr_upper_bound(n, 0.01) for n in range(99, 1600)}
    assert bounds[312] > 0.02 and all(b <= 0.02 for n, b in bounds.items() if n >= 313)
    assert bounds[149] <= 0.02  # the saw-tooth: some smaller n are within, but not all after them
    for a in (0.05, 0.1):
        need = images_needed(a)
        ns = range(min_images(a), need + int(20 / a))
        assert fpr_upper_bound(need - 1, a) > 2 * a and all(fpr_upper_bound(n, a) <= 2 * a for n in ns if n >= need)


def test_top_values_give_the_exact_order_statistic_in_bounded_memory():
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randint(0, 50, (int(torch.randint(1, 4000, (1,), generator=g)),), generator=g).float() / 7
              for _ in range(40)]  # many ties
    everything = torch.cat(chunks)
    total = everything.numel()
    cal = NormalCalibrator(0.5, 0.003, max_pixels=total + 1000)  # an upper bound of the pixels, as the CLI gives
    for c in chunks:
        cal.pixels.add(c)
        assert cal.pixels.top.numel() <= cal.pixels.capacity
    k = conformal_rank(total, 0.003)
    value = everything.sort().values[k - 1]
    assert cal.pixels.largest(total - k + 1) == value
    assert cal.pixels.capacity == math.floor((total + 1001) * 0.003) < total // 100
    top = TopValues(5)
    top.add(torch.tensor([3.0, 1.0, 2.0]))
    top.add(torch.tensor([5.0, 0.0, 4.0, 4.0]))
    assert [float(top.largest(m)) for m in (1, 2, 3, 4, 5)] == [5.0, 4.0, 4.0, 3.0, 2.0]
    assert (top.count, top.min, top.max) == (7, 0.0, 5.0)


def _brute_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Every distinct score as threshold, F1 of ``score >= t`` counted explicitly; the highest t among the best."""
    best, best_t = -1.0, None
    for t in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= t
        tp = int((flagged & labels).sum())
        fp = int((flagged & ~labels).sum())
        fn = int((~flagged & labels).sum())
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best + 1e-15:
            best, best_t = f1, t
    return best, best_t


@pytest.mark.parametrize("seed", range(6))
def test_f1_max_threshold_equals_an_explicit_search(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.7)
    labels[0], labels[1] = True, False
    scores = rng.normal(labels * rng.uniform(0.5, 2.0), 1.0)
    if seed % 2:
        scores = np.round(scores, 1)  # ties
    scores = scores.astype(np.float32)
    f1, t = f1_max_threshold(torch.from_numpy(scores), torch.from_numpy(labels))
    bf1, bt = _brute_f1(scores, labels)
    assert abs(f1 - bf1) < 1e-12 and t == bt


# --------------------------------------------------------------------------- decisions in predict


def test_normalisation_keeps_each_value_on_its_side_of_the_threshold():
    thr = 0.3
    below = float(torch.nextafter(torch.tensor(thr, dtype=torch.float32), torch.tensor(0.0)))
    x = torch.tensor([-5.0, below, thr, 0.7, 50.0], dtype=torch.float32)
    y = normalize_min_max(x, float(torch.tensor(thr, dtype=torch.float32)), 0.0, 1e6)  # huge span: rounding would reach 0.5
    assert y[0] < y[1] < 0.5 <= y[2] < y[3] < y[4] <= 1.0
    assert torch.equal(y >= 0.5, x >= float(torch.tensor(thr, dtype=torch.float32)))
    z = normalize_min_max(torch.tensor([0.2, 0.4, 0.6]), 0.4, 0.2, 0.6)  # anomalib: (x - thr) / (max - min) + 0.5
    assert torch.allclose(z, torch.tensor([0.0, 0.5, 1.0]))


@pytest.fixture(scope="module")
def det():
    return tiny_detector("winclip", image_size=SIZE)


def test_predict_labels_and_masks_follow_the_thresholds(det):
    images = synthetic_set(6, 48, seed=3).images
    raw = det.predict(images)
    assert raw.labels is None and raw.masks is None and raw.image_threshold is None
    thr, pix = float(raw.image_scores.median()), float(raw.anomaly_maps.quantile(0.9))
    det.set_thresholds(Thresholds(image=thr, pixel=pix))
    try:
        pred = det.predict(images)
        assert torch.equal(pred.image_scores, raw.image_scores)
        assert torch.equal(pred.labels, raw.image_scores >= thr) and 0 < int(pred.labels.sum()) < 6
        assert pred.masks.dtype == torch.bool and torch.equal(pred.masks, raw.anomaly_maps >= pix)
        assert (pred.image_threshold, pred.pixel_threshold) == (thr, pix)
        # run-time overrides, in the returned units; calibrated=False: raw, no stored decision
        over = det.predict(images, threshold=-1e9, pixel_threshold=1e9)
        assert bool(over.labels.all()) and not bool(over.masks.any())
        assert det.predict(images, calibrated=False).labels is None
        # inputs of different sizes: masks follow the list of maps
        mixed = det.predict([images[0], images[1, :, :40, :30]])
        assert isinstance(mixed.masks, list) and [tuple(m.shape) for m in mixed.masks] == [(48, 48), (40, 30)]
        assert all(torch.equal(m, a >= pix) for m, a in zip(mixed.masks, mixed.anomaly_maps))
        # per class: a class's own thresholds win, others fall back to the default set ("")
        det.set_thresholds(Thresholds(image=1e9), "bottle")
        assert not bool(det.predict(images, class_name="bottle").labels.any())
        assert det.predict(images, class_name="bottle").masks is None
        cable = det.predict(images, class_name="cable")  # other prompts, other scores; the default thresholds
        assert cable.image_threshold == thr and torch.equal(cable.labels, cable.image_scores >= thr)
        # normalised: scores in [0, 1], threshold 0.5, the same decisions
        lo, hi = float(raw.image_scores.min()), float(raw.image_scores.max())
        det.set_thresholds(Thresholds(image=thr, pixel=pix, image_range=(lo, hi),
                                      pixel_range=(float(raw.anomaly_maps.min()), float(raw.anomaly_maps.max()))))
        norm = det.predict(images)
        assert norm.image_threshold == 0.5 == norm.pixel_threshold
        assert torch.equal(norm.labels, pred.labels) and torch.equal(norm.masks, pred.masks)
        assert torch.allclose(norm.image_scores, ((raw.image_scores - thr) / (hi - lo) + 0.5).clamp(0, 1), atol=1e-6)
        assert float(norm.anomaly_maps.min()) >= 0 and float(norm.anomaly_maps.max()) <= 1
    finally:
        det.load_thresholds({})


def test_thresholds_are_checked():
    with pytest.raises(InvalidValueError, match="finite"):
        Thresholds(image=math.nan)
    with pytest.raises(InvalidValueError, match="without a pixel threshold"):
        Thresholds(image=1.0, pixel_range=(0.0, 1.0))
    with pytest.raises(InvalidValueError, match="min <= max"):
        Thresholds(image=1.0, image_range=(2.0, 1.0))
    with pytest.raises(clipad.errors.InvalidTypeError):
        det = tiny_detector("winclip", image_size=SIZE)
        det.predict(torch.rand(1, 3, 32, 32), threshold="0.5")


# --------------------------------------------------------------------------- calibration end to end


def test_fpr_calibration_holds_on_other_normal_images(det, tmp_path):
    """300 generated normal images calibrate at FPR 1%, 300 others of the same kind test it: the
    number flagged must be plausible under the conformal law (beta-binomial), the threshold the
    298th smallest calibration score, and the file keeps it with its provenance."""
    cal_images = synthetic_set(300, 32, seed=11, anomalous_fraction=0.0).images
    test_images = synthetic_set(300, 32, seed=12, anomalous_fraction=0.0).images
    with pytest.warns(ClipadWarning, match="313 images keep it within 2x"):  # 300 < 313: the bound is 2.1x
        [result] = calibrate(det, cal_images, fpr=0.01, batch_size=100)
    try:
        th = det.thresholds[""]
        assert result.thresholds is th and th.provenance["strategy"] == "fpr"
        raw = det.predict(cal_images, batch_size=100, calibrated=False)
        kth = raw.image_scores.sort().values[297]
        assert th.image == float(torch.nextafter(kth, torch.tensor(math.inf)))
        assert int((raw.image_scores >= th.image).sum()) == 2  # n - k above s_(k): 300 - 298
        all_pixels = raw.anomaly_maps.flatten().sort().values
        kp = conformal_rank(all_pixels.numel(), 0.001)
        assert th.pixel == float(torch.nextafter(all_pixels[kp - 1], torch.tensor(math.inf)))
        pred = det.predict(test_images, batch_size=100)
        flagged = int(pred.labels.sum())
        p = th.provenance
        assert p["n_images"] == 300 and p["order_statistic"] == 298 and p["fpr_target"] == 0.01
        law = stats.betabinom(300, 300 + 1 - 298, 298)
        assert law.sf(flagged - 1) > 1e-3, f"{flagged}/300 flagged: implausible under the conformal law"
        pixel_rate = float(pred.masks.float().mean())
        print(f"end to end: target FPR 0.01, achieved {flagged}/300 = {flagged / 300:.4f} on new normal images "
              f"(expected {p['expected_fpr']:.4f}, 95% bound {p['fpr_bound']:.4f}); pixel FPR target 0.001, "
              f"achieved {pixel_rate:.5f} on the new images")
        assert pixel_rate < 0.01
        det.save(tmp_path / "cal.safetensors")
        back = clipad.load_detector(tmp_path / "cal.safetensors", device="cpu")
        assert back.thresholds == det.thresholds
        assert torch.equal(back.predict(test_images, batch_size=100).labels, pred.labels)
        assert json.loads(read_header(tmp_path / "cal.safetensors")[0]["thresholds"])[""]["provenance"]["date"]
    finally:
        det.load_thresholds({})


def test_too_few_normal_images_warn_or_fail(det):
    images = synthetic_set(120, 32, seed=5, anomalous_fraction=0.0).images
    with pytest.warns(ClipadWarning, match=r"120 normal images .* 313 images keep it within 2x"):
        calibrate(det, images, fpr=0.01, pixel_fpr=None)
    assert det.thresholds[""].pixel is None
    with pytest.raises(InvalidValueError, match="at least 99"):
        calibrate(det, images[:50], fpr=0.01)
    det.load_thresholds({})


def test_f1_calibration_on_a_labelled_folder(det, tmp_path):
    root = tmp_path / "widget"
    write_folder_dataset(root, n_normal=8, n_abnormal=8, size=48, seed=4)
    ds = folder_dataset(root, "good", "bad", "masks")
    [result] = calibrate(det, dataset=ds, normalize=True)
    try:
        assert result.class_name == "widget" and set(det.thresholds) == {"widget"}
        th = det.thresholds["widget"]
        # the image threshold: an explicit search over the scores predict gives these files
        samples = list(ds)
        raw = det.predict([load_image(s.image_path) for s in samples], class_name="widget", calibrated=False)
        labels = np.array([s.label == 1 for s in samples])
        f1, t = _brute_f1(raw.image_scores.numpy(), labels)
        assert th.image == t and abs(th.provenance["image_f1"] - f1) < 1e-12
        # the pixel threshold: the same search over the maps at the model size (images resized as
        # predict resizes them), masks resized there by nearest neighbour, as clipad eval compares them
        x = resize_batch([pil_to_tensor(load_image(s.image_path)) for s in samples], (SIZE, SIZE), torch.device("cpu"))
        _, maps = det.score_normalized(det.backbone.normalize(x), "widget")
        masks = [torch.zeros(SIZE, SIZE, dtype=torch.bool) if s.mask_path is None else torch.nn.functional.interpolate(
                 torch.from_numpy(load_mask(s.mask_path)).float()[None, None], size=(SIZE, SIZE), mode="nearest")[0, 0] > 0.5
                 for s in samples]
        pf1, pt = _brute_f1(maps.numpy().ravel(), torch.stack(masks).numpy().ravel())
        assert abs(th.provenance["pixel_f1"] - pf1) < 1e-12 and th.pixel == pt
        assert th.provenance["n_pixels"] == len(samples) * SIZE * SIZE
        assert th.image_range == (float(raw.image_scores.min()), float(raw.image_scores.max()))
        pred = det.predict([load_image(s.image_path) for s in samples], class_name="widget")
        assert pred.image_threshold == 0.5 and torch.equal(pred.labels, raw.image_scores >= th.image)
        assert det.predict([load_image(samples[0].image_path)]).labels is None  # no thresholds for "object"
    finally:
        det.load_thresholds({})


# --------------------------------------------------------------------------- files


LEGACY = FIXTURES_DIR / "legacy"


@pytest.mark.parametrize("method", ["winclip", "anomalyclip"])
def test_files_without_thresholds_still_load(method):
    det = clipad.load_detector(LEGACY / f"{method}.safetensors", device="cpu")
    assert dict(det.thresholds) == {}
    assert det.predict(torch.rand(1, 3, 64, 64)).labels is None


def _with_header_entry(src: Path, dst: Path, key: str, value: str) -> None:
    """A copy of the safetensors file ``src`` with one header metadata entry replaced."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"][key] = value
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize("bad, words", [
    ('{"": {"image": NaN}}', "finite number or null"),
    ('{"": {"image": null, "image_range": [0, 1]}}', "without a 'image' threshold"),
    ('{"": {"image": 1, "image_range": [2, 1]}}', "min <= max"),
    ('{"": {"image": 1, "colour": 3}}', "unknown key"),
    ('[1, 2]', "must be a JSON object"),
    ('{"": {"image": 1, "provenance": {"n": [1, 2]}}}', "provenance entry 'n'"),
])
def test_damaged_thresholds_are_one_checkpoint_error(det, tmp_path, bad, words):
    det.set_thresholds(Thresholds(image=0.5, provenance={"strategy": "fpr"}))
    try:
        det.save(tmp_path / "ok.safetensors")
    finally:
        det.load_thresholds({})
    _with_header_entry(tmp_path / "ok.safetensors", tmp_path / "bad.safetensors", "thresholds", bad)
    with pytest.raises(CheckpointError, match="header entry 'thresholds'") as info:
        clipad.load_detector(tmp_path / "bad.safetensors", device="cpu")
    assert words in str(info.value)


# --------------------------------------------------------------------------- command line and service


FAST = ["--backbone", "tiny", "--pretrained", "none", "--image-size", str(SIZE), "--quiet"]


def _write_normals(d: Path, n: int, seed: int, size: int = 40) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    images = synthetic_set(n, size, seed=seed, anomalous_fraction=0.0).images
    paths = []
    for i, img in enumerate(images):
        paths.append(d / f"n{i:03d}.png")
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def test_cli_calibrate_then_predict_writes_labels_and_masks(tmp_path):
    _write_normals(tmp_path / "cal", 40, seed=7)
    new = _write_normals(tmp_path / "new", 6, seed=8)
    det_file = tmp_path / "cal.safetensors"
    code, out, err = _run(["calibrate", str(tmp_path / "cal"), *FAST, "--fpr", "0.05", "--pixel-fpr", "0.01",
                           "--class-name", "tile", "--out", str(det_file)])
    assert code == 0, err
    assert "class 'tile': fpr calibration from 40 image(s)" in out and "95% upper bound" in out
    assert "warning: 40 normal images place the threshold at FPR 0.05" in err  # under images_needed(0.05) = 61
    det = clipad.load_detector(det_file, device="cpu")
    th = det.thresholds["tile"]
    assert th.provenance["n_images"] == 40 and th.provenance["class_name"] == "tile"

    code, out, err = _run(["predict", *map(str, new), "--detector", str(det_file), "--class-name", "tile",
                           "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, err
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pred = det.predict([load_image(p) for p in new], class_name="tile")
    assert [r["label"] for r in rows] == [str(int(v)) for v in pred.labels]
    assert [int(r["label"]) for r in rows] == [int(float(r["score"]) >= th.image) for r in rows]
    for r, mask in zip(rows, pred.masks):
        png = np.asarray(Image.open(tmp_path / "out" / "masks" / (Path(r["heatmap"]).name)))
        assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
        assert np.array_equal(png == 255, mask.numpy())
    # the run-time override; a class without thresholds: no label column, a note says why
    code, _, err = _run(["predict", *map(str, new), "--detector", str(det_file), "--out", str(tmp_path / "o2"), "--quiet"])
    assert code == 0 and "none for 'object'" in err
    assert "label" not in (tmp_path / "o2" / "scores.csv").read_text().splitlines()[0]
    code, _, err = _run(["predict", *map(str, new), "--detector", str(det_file), "--threshold=-1e9",
                         "--out", str(tmp_path / "o3"), "--quiet"])
    assert code == 0, err
    with open(tmp_path / "o3" / "scores.csv", newline="") as f:
        assert {r["label"] for r in csv.DictReader(f)} == {"1"}


def test_cli_calibrate_from_a_labelled_dataset(tmp_path):
    root = tmp_path / "widget"
    write_folder_dataset(root, n_normal=6, n_abnormal=6, size=48, seed=9)
    out_file = tmp_path / "f1.safetensors"
    code, out, err = _run(["calibrate", "--dataset", "folder", "--root", str(root), "--normal-dir", "good",
                           "--abnormal-dir", "bad", "--mask-dir", "masks", *FAST, "--out", str(out_file)])
    assert code == 0, err
    assert "class 'widget': f1max calibration from 12 image(s)" in out and "pixel F1-max" in out
    th = clipad.load_detector(out_file, device="cpu").thresholds["widget"]
    assert th.provenance["strategy"] == "f1max" and th.pixel is not None


@pytest.mark.parametrize("extra, words", [
    (["--dataset", "folder", "--root", "{root}", "--normal-dir", "good"], "IMAGES_OR_DIRS: not with --dataset"),
    ([], None),  # placeholder replaced below: no inputs at all
    (["--fpr", "0"], "--fpr: must be a number between 0 and 1"),
    (["--pixel-fpr", "1.5"], "--pixel-fpr: must be a number between 0 and 1"),
    (["--classes", "a"], "--classes: only with --dataset"),
    (["--root", "{root}"], "--root: only with --dataset"),
])
def test_cli_calibrate_usage_errors(tmp_path, extra, words):
    root = tmp_path / "data"
    _write_normals(root / "good", 2, seed=1)
    argv = ["calibrate", *FAST, "--out", str(tmp_path / "x.safetensors")]
    if words is None:
        words = "give normal images"
    else:
        argv.insert(1, str(root / "good"))
    code, _, err = _run(argv + [e.format(root=root) for e in extra])
    assert code == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_calibrate_refuses_few_images_and_reference_images(tmp_path):
    paths = _write_normals(tmp_path / "cal", 12, seed=2)
    code, _, err = _run(["calibrate", str(tmp_path / "cal"), *FAST, "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "12 normal image(s) cannot place a threshold at FPR 0.01" in err and "at least 99" in err
    code, _, err = _run(["calibrate", str(tmp_path / "cal"), *FAST, "--fpr", "0.1", "--out", str(tmp_path / "x.safetensors"),
                         "--reference", str(paths[0])])
    assert code == 2 and "also --reference images" in err
    code, _, err = _run(["calibrate", "--dataset", "folder", "--root", str(tmp_path), "--normal-dir", "cal",
                         *FAST, "--fpr", "0.1", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "--fpr: only for normal images" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_serve_decides_with_the_calibrated_threshold(det):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipad.serve.app import create_app

    images = [Image.fromarray((synthetic_set(1, 48, seed=s).images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
              for s in range(4)]
    scores = det.predict(images).image_scores
    thr = float(scores.sort().values[2])  # two of the four at or above it
    det.set_thresholds(Thresholds(image=thr))
    det.set_thresholds(Thresholds(image=1e9), "bottle")

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    files = [("files", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(images)]
    try:
        with TestClient(create_app(det)) as c:
            res = c.post("/v1/predict", files=files, data={"maps": "none"}).json()["results"]
            assert [r["decision"] for r in res] == ["anomalous" if s >= thr else "normal" for s in scores.tolist()]
            assert sorted(r["decision"] for r in res) == ["anomalous", "anomalous", "normal", "normal"]
            res = c.post("/v1/predict", files=files, data={"maps": "none", "class_name": "bottle"}).json()["results"]
            assert {r["decision"] for r in res} == {"normal"}  # the class's own threshold
            info = c.get("/v1/info").json()
            assert info["threshold"] == thr and info["calibrated_classes"] == ["", "bottle"]
        with TestClient(create_app(det, threshold=-1e9)) as c:  # --threshold overrides
            res = c.post("/v1/predict", files=files, data={"maps": "none", "class_name": "bottle"}).json()["results"]
            assert {r["decision"] for r in res} == {"anomalous"}
    finally:
        det.load_thresholds({})
    with TestClient(create_app(det)) as c:  # no thresholds: no decision, as before
        assert "decision" not in c.post("/v1/predict", files=files[:1]).json()["results"][0]
