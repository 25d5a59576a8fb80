"""clipad.distributed on a local Ray instance (2 CPUs, the ``tiny`` backbone, a generated
MVTec-layout set): the same scores and metrics as the single-process paths, every image exactly
once after an actor dies, and a resumed run that scores only what an earlier, failed run left.

One Ray instance serves the module (starting one takes seconds); each test is one or two jobs.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="clipad.distributed needs Ray Data: pip install \"clipad[ray]\"")

import clipad.distributed as dist  # noqa: E402
from _helpers import tiny_detector  # noqa: E402
from clipad.cli import main  # noqa: E402
from clipad.data import create_dataset  # noqa: E402
from clipad.data.images import load_image  # noqa: E402
from clipad.distributed.shards import read_shards  # noqa: E402
from clipad.errors import ClipadError, SkippedInputWarning  # noqa: E402
from clipad.eval.run import run  # noqa: E402

SIZE = 64  # model input size: a multiple of tiny's patch size
TOL = 1e-6  # the bound: one float32 model, batches of other compositions (rounding only)


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _image(path: Path, rng, defect: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(Image.fromarray((rng.random((6, 6, 3)) * 150 + 50).astype(np.uint8)).resize((40, 48))).copy()
    if defect:
        a[10:22, 8:20] = 255
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    """Two classes: 2 train/good, 3 test/good, 3 test/crack with masks each; 40x48 px."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("ray") / "mvtec"
    for cls in ("bottle", "screw"):
        for i in range(2):
            _image(root / cls / "train" / "good" / f"{i:03d}.png", rng)
        for i in range(3):
            _image(root / cls / "test" / "good" / f"{i:03d}.png", rng)
            _image(root / cls / "test" / "crack" / f"{i:03d}.png", rng, defect=True)
            m = np.zeros((48, 40), np.uint8)
            m[10:22, 8:20] = 255
            (root / cls / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(root / cls / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def _scores_csv(out: Path) -> dict[str, float]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len({r["path"] for r in rows}) == len(rows)  # each image once
    return {r["path"]: float(r["score"]) for r in rows}


def test_predict_resumes_a_failed_run_survives_an_actor_death_and_matches_single_process(mvtec, tmp_path, monkeypatch):
    """1-shot WinCLIP (the reference memory travels in the detector file) over 6 images and a
    corrupt file, batches of 2.

    Run 1 fails after 2 batches (as a killed run): their complete shards stay. Run 2 resumes, and its
    first actor batch kills its process: Ray restarts the actor and retries the batch. Run 2
    scores only the images run 1 did not finish (counted by a hook, not timed); the output holds
    every readable image exactly once, with the scores and maps of the single-process detector."""
    test_dir = mvtec / "bottle" / "test"
    (test_dir / "good" / "broken.png").write_bytes(b"not a png")
    hooks = {name: tmp_path / name for name in ("fail_after", "fail_once", "first", "second")}
    for d in hooks.values():
        d.mkdir()
    det = tiny_detector("winclip", image_size=SIZE)
    ref = [load_image(mvtec / "bottle" / "train" / "good" / "000.png")]
    out = tmp_path / "out"
    kwargs = dict(detector=det, references=ref, class_name="bottle", batch_size=2, progress=False)
    try:
        monkeypatch.setenv("CLIPAD_RAY_FAIL_AFTER", f"2:{hooks['fail_after']}")
        monkeypatch.setenv("CLIPAD_RAY_COUNT_DIR", str(hooks["first"]))
        with pytest.raises(ClipadError, match="run again with resume"), warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedInputWarning)  # broken.png may come before the failure or not
            dist.predict([test_dir], out, **kwargs)
        assert 1 <= len(list((out / "shards").iterdir())) <= 2  # a batch of broken.png alone writes none
        finished = {int(r["index"]) for _, rows in read_shards(out) for r in rows}
        monkeypatch.delenv("CLIPAD_RAY_FAIL_AFTER")
        monkeypatch.setenv("CLIPAD_RAY_FAIL_ONCE", str(hooks["fail_once"]))
        monkeypatch.setenv("CLIPAD_RAY_COUNT_DIR", str(hooks["second"]))
        with pytest.warns(SkippedInputWarning, match="broken.png"):
            summary = dist.predict([test_dir], out, resume=True, **kwargs)
        assert (hooks["fail_once"] / "failed").is_file()  # an actor did die
    finally:
        (test_dir / "good" / "broken.png").unlink()
    before = {int(p.name.split(".")[0]) for p in hooks["first"].iterdir()}
    again = Counter(int(p.name.split(".")[0]) for p in hooks["second"].iterdir())
    assert before == finished and 0 < len(before) < 6 and summary["skipped_resumed"] == len(before)
    assert not before & set(again)  # nothing finished was scored again ...
    assert summary["images"] == 7 and summary["scored"] == 6 - len(before) == len(again)  # ... the rest once
    assert [Path(p).name for p, _ in summary["failed"]] == ["broken.png"]
    assert set(summary) >= {"images", "scored", "skipped_resumed", "failed", "seconds", "images_per_s", "shards"}
    got = _scores_csv(out)
    assert len(got) == 6  # every readable image exactly once

    paths = sorted(p for p in test_dir.rglob("*.png"))
    det.set_reference(ref, class_name="bottle")
    pred = det.predict([load_image(p) for p in paths], class_name="bottle")
    want = {str(p): float(s) for p, s in zip(paths, pred.image_scores)}
    assert set(got) == set(want)
    assert max(abs(got[k] - want[k]) for k in want) <= TOL + 5e-7  # scores.csv holds 6 decimals
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            i = paths.index(Path(row["path"]))
            with np.load(out / "maps" / f"{row['shard']}.npz") as z:
                amap = z[row["row"]]
            assert amap.shape == tuple(pred.anomaly_maps[i].shape)
            assert np.abs(amap - pred.anomaly_maps[i].numpy()).max() <= TOL
    with pytest.raises(ClipadError, match="differ"):  # another detector's scores are never merged in
        dist.predict([test_dir], out, detector=tiny_detector("winclip", image_size=SIZE, scales=(2,)), resume=True,
                     progress=False)


def test_eval_cli_matches_single_process_eval(mvtec, tmp_path):
    """``clipad eval --ray``: every metric of every class as the single-process evaluation gives it."""
    out = tmp_path / "eval"
    rc = main(["eval", "--dataset", "mvtec", "--root", str(mvtec), "--backbone", "tiny", "--pretrained", "none",
               "--image-size", str(SIZE), "--shots", "1", "--batch-size", "3", "--quiet", "--out", str(out), "--ray"])
    assert rc == 0
    got = json.loads((out / "metrics.json").read_text())
    det = tiny_detector("winclip", image_size=SIZE)
    want = run(det, create_dataset("mvtec", mvtec), classes=None, shots=1, seed=10, eval_size=None, batch_size=3,
               workers=0, protocol="anomalyclip", n_examples=3, quiet=True)
    assert set(got["classes"]) == {"bottle", "screw"}
    for r in want.classes:
        assert got["classes"][r.name]["n_images"] == r.n_images == 6
        for k, v in r.metrics.items():
            assert got["classes"][r.name][k] == pytest.approx(v, abs=TOL), (r.name, k)
    for k, v in want.mean.items():
        assert got["mean"][k] == pytest.approx(v, abs=TOL), k
    assert (out / "report.html").is_file()


def test_a_transductive_method_and_no_images_are_refused(tmp_path):
    """MuSc-like methods score a class's images against each other: batches across actors would
    change their scores, so the call refuses them (one line) before any job starts; so are inputs
    without images."""
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    det = tiny_detector("winclip", image_size=64)
    det.transductive = True
    with pytest.raises(ClipadError, match="transductive"):
        dist.predict([tmp_path], tmp_path / "o", detector=det)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipadError, match="no images"):
        dist.predict([tmp_path / "empty"], tmp_path / "o", detector=det)
