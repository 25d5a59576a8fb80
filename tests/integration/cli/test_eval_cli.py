"""`clipad eval` end to end on generated folder and MVTec-layout datasets (tiny backbone)."""

from __future__ import annotations

import json
import math
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import clipad
from clipad.cli import main

TINY = ["--backbone", "tiny", "--pretrained", "none", "--quiet", "--workers", "0"]


def _img(path: Path, rng, defect: bool = False, size=(64, 80)) -> None:
    a = (rng.random((*size, 3)) * 255).astype(np.uint8)
    if defect:
        a[10:30, 20:40] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _mask(path: Path, size=(64, 80)) -> None:
    m = np.zeros(size, np.uint8)
    m[10:30, 20:40] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "line3"
    for i in range(5):
        _img(root / "good" / f"g{i}.png", rng)
    for i in range(4):
        _img(root / "bad" / f"b{i}.png", rng, defect=True)
        _mask(root / "masks" / f"b{i}.png")
    return root


def _run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def test_folder_eval_writes_every_output(folder, tmp_path, capsys):
    out = tmp_path / "O"
    rc = _run(["eval", "--dataset", "folder", "--root", str(folder), "--normal-dir", "good", "--abnormal-dir", "bad",
               "--mask-dir", "masks", "--method", "winclip", *TINY, "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "image auroc" in printed and "mean" in printed
    for name in ("metrics.json", "metrics.csv", "curves.png", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "metrics.json").read_text())
    row = data["classes"]["line3"]
    assert row["n_images"] == 9 and row["n_anomalous"] == 4
    for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert 0.0 <= row[key] <= 1.0, key
        assert data["mean"][key] == pytest.approx(row[key])
    csv_lines = (out / "metrics.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("class,n_images,n_anomalous,image_auroc")
    assert [l.split(",")[0] for l in csv_lines[1:]] == ["line3", "mean"]
    html = (out / "report.html").read_text()
    HTMLParser().feed(html)
    assert "line3" in html and "data:image" in html

    # image metrics agree with sklearn on scores from det.predict on the same files
    det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu")
    paths = sorted((folder / "good").glob("*.png")) + sorted((folder / "bad").glob("*.png"))
    labels = [0] * 5 + [1] * 4
    scores = det.predict(paths, class_name="line3").image_scores.numpy()
    assert row["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert row["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)


def test_unreadable_file_is_skipped_counted_and_fails_the_run(folder, tmp_path, capsys):
    (folder / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n-truncated")
    _mask(folder / "masks" / "broken.png")
    out = tmp_path / "O"
    rc = _run(["eval", "--dataset", "folder", "--root", str(folder), "--normal-dir", "good", "--abnormal-dir", "bad",
               "--mask-dir", "masks", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert sum("broken.png" in line for line in err.splitlines() if "skipped" in line) == 1
    data = json.loads((out / "metrics.json").read_text())
    assert data["classes"]["line3"]["n_images"] == 9
    assert len(data["failures"]) == 1


def test_mvtec_layout_few_shot_and_class_without_anomalies(tmp_path, capsys):
    rng = np.random.default_rng(1)
    root = tmp_path / "mvtec"
    for cls in ("bottle", "screw"):
        for i in range(3):
            _img(root / cls / "train" / "good" / f"{i:03d}.png", rng)
        for i in range(2):
            _img(root / cls / "test" / "good" / f"{i:03d}.png", rng)
    for i in range(2):  # only bottle has anomalies
        _img(root / "bottle" / "test" / "crack" / f"{i:03d}.png", rng, defect=True)
        _mask(root / "bottle" / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    out = tmp_path / "O"
    rc = _run(["eval", "--dataset", "mvtec", "--root", str(root), *TINY, "--shots", "1", "--seed", "10", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["classes"]) == {"bottle", "screw"}
    assert data["classes"]["screw"]["image_auroc"] is None  # NaN: no anomalies
    assert data["mean"]["image_auroc"] == pytest.approx(data["classes"]["bottle"]["image_auroc"])
    assert "screw" in data["excluded_from_mean"]["image_auroc"]
    assert "n/a" in captured.out and "left out of the mean" in captured.out
    assert data["config"]["shots"] == 1


def test_missing_root_is_a_clear_error(tmp_path, capsys):
    rc = _run(["eval", "--dataset", "mvtec", "--root", str(tmp_path / "nope"), *TINY, "--out", str(tmp_path / "O")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope" in err


def test_unknown_class_lists_the_real_ones(folder, tmp_path, capsys):
    rc = _run(["eval", "--dataset", "folder", "--root", str(folder), "--normal-dir", "good", "--abnormal-dir", "bad",
               *TINY, "--classes", "widget", "--out", str(tmp_path / "O")])
    err = capsys.readouterr().err
    assert rc == 2 and "widget" in err and "line3" in err


def test_visa_and_meta_layouts_evaluate(tmp_path):
    from test_data import _make_mvtec, _make_visa, _official_style_meta

    visa = _make_visa(tmp_path / "visa")
    out = tmp_path / "Ov"
    rc = _run(["eval", "--dataset", "visa", "--root", str(visa), *TINY, "--image-size", "64", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["classes"]) == {"candle", "pcb1"}
    assert data["classes"]["candle"]["n_images"] == 3 and data["classes"]["candle"]["n_anomalous"] == 2

    mvtec = _make_mvtec(tmp_path / "mv")
    (mvtec / "meta.json").write_text(json.dumps(_official_style_meta(mvtec)))
    out_meta = tmp_path / "Om"
    out_dir = tmp_path / "Od"
    assert _run(["eval", "--dataset", "meta", "--root", str(mvtec), *TINY, "--image-size", "64", "--out", str(out_meta)]) == 0
    assert _run(["eval", "--dataset", "mvtec", "--root", str(mvtec), *TINY, "--image-size", "64", "--out", str(out_dir)]) == 0
    by_meta = json.loads((out_meta / "metrics.json").read_text())
    by_dirs = json.loads((out_dir / "metrics.json").read_text())
    # the same images indexed two ways give the same metrics
    assert by_meta["classes"] == by_dirs["classes"]


def test_tiling_method_evaluates_non_square_images(folder, tmp_path):
    # AnoCLIP keeps the aspect ratio of the 64x80 images (tiles); maps are compared at eval size
    out = tmp_path / "Oa"
    rc = _run(["eval", "--dataset", "folder", "--root", str(folder), "--normal-dir", "good", "--abnormal-dir", "bad",
               "--mask-dir", "masks", "--method", "anoclip", *TINY, "--image-size", "64",
               "--set", "augment_views=false", "--out", str(out)])
    assert rc == 0
    row = json.loads((out / "metrics.json").read_text())["classes"]["line3"]
    assert row["n_images"] == 9 and 0.0 <= row["pixel_aupro"] <= 1.0


@pytest.mark.parametrize("method", ["adaptclip", "anomalyclip"])
def test_train_then_eval_with_checkpoint(folder, tmp_path, method):
    out = tmp_path / "run"
    rc = _run(["train", "--method", method, "--dataset", "folder", "--root", str(folder), "--normal-dir", "good",
               "--abnormal-dir", "bad", "--mask-dir", "masks", *TINY, "--image-size", "64", "--batch-size", "4",
               "--epochs", "1", "--out", str(out)])
    assert rc == 0
    ckpt = out / f"{method}.safetensors"
    assert ckpt.is_file()
    shots = ["--shots", "1"] if method == "adaptclip" else []
    res = tmp_path / "eval"
    rc = _run(["eval", "--dataset", "folder", "--root", str(folder), "--normal-dir", "good", "--abnormal-dir", "bad",
               "--mask-dir", "masks", "--method", method, *TINY, "--image-size", "64", "--checkpoint", str(ckpt),
               *shots, "--out", str(res)])
    assert rc == 0
    data = json.loads((res / "metrics.json").read_text())
    assert 0.0 <= data["mean"]["image_auroc"] <= 1.0
    # the trained weights are what eval used: an untrained detector scores differently
    trained = clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", image_size=64,
                                     checkpoint=str(ckpt))
    fresh = clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", image_size=64)
    x = torch.rand(2, 3, 64, 64)
    assert not torch.allclose(trained.predict(x).anomaly_maps, fresh.predict(x).anomaly_maps)
