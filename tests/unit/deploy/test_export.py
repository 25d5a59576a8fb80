"""``clipad export`` / :mod:`clipad.deploy.export` and the torch-free runtime
(:class:`clipad.deploy.OnnxDetector`, ``clipad predict --model``).

Every exportable method and mode is exported once (module fixture, tiny backbone at 64 px) and
verified against the eager detector at the fp32 tolerance 1e-4; ``pytest -s`` prints the
measured differences. The runtime is checked where torch cannot be imported at all (a
subprocess with ``sys.modules["torch"] = None``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from _helpers import tiny_detector

from clipad.cli import main
from clipad.deploy import OnnxDetector
from clipad.deploy import export as ex
from clipad.deploy import manifest as mf
from clipad.errors import (
    ClipadWarning,
    ImageReadError,
    InvalidTypeError,
    InvalidValueError,
    MissingFileError,
)
from clipad.methods.base import Thresholds

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # a 4x4 patch grid on tiny: every export and run stays fast
#: (method, options, reference shots) of every exportable method and mode
CASES = {
    "winclip-0shot": ("winclip", {}, 0),
    "winclip-1shot": ("winclip", {}, 1),
    "anoclip": ("anoclip", {}, 0),  # without test-time adaptation (the 22-view score included)
    "anomalyclip": ("anomalyclip", {}, 0),
    "adaptclip-0shot": ("adaptclip", {}, 0),
    "adaptclip-1shot": ("adaptclip", {}, 1),
    "tokenclip": ("tokenclip", {}, 0),  # Sinkhorn: a fixed 100 iterations in the graph
}


def _images(n: int, seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return ex.verification_images(n, size, seed=seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    """case -> (detector, ExportResult, Verification): each case exported and verified once."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for case, (method, options, shots) in CASES.items():
        det = tiny_detector(method, image_size=SIZE, **options)
        if shots:
            det.set_reference(torch.from_numpy(_images(shots, seed=99)).permute(0, 3, 1, 2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ClipadWarning)
            result, check = ex.export_and_verify(det, root / f"{case}.onnx", class_name="bottle", verify_images=3)
        EXPORT_WARNINGS[case] = [str(w.message) for w in caught if issubclass(w.category, ClipadWarning)]
        out[case] = (det, result, check)
    return out


#: case -> the ClipadWarnings its export gave (filled by the ``exported`` fixture)
EXPORT_WARNINGS: dict[str, list[str]] = {}


def test_only_anoclip_warns_that_non_square_images_are_squashed(exported):
    assert [c for c, w in EXPORT_WARNINGS.items() if w] == ["anoclip"]
    assert "non-square images" in EXPORT_WARNINGS["anoclip"][0]


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_the_torch_detector(exported, case):
    det, result, check = exported[case]
    print(f"{case}: {check.summary()} (export {result.seconds:.2f} s, {result.size_bytes / 1e6:.2f} MB)")
    assert check.images == 3
    assert check.max_score_diff <= 1e-4 and check.max_map_diff <= 1e-4
    assert check.batch_diff <= 1e-4  # traced at batch 2; batches of 3 and 1 run
    assert check.passed
    assert result.manifest.data["verification"]["passed"] is True
    # the graph is the detector's: other images than the ones verified agree as well
    imgs = _images(2, seed=5)
    got = OnnxDetector(result.path).predict(list(imgs), class_name="bottle")
    ref = det.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2), class_name="bottle")
    np.testing.assert_allclose(got.image_scores, ref.image_scores.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.anomaly_maps, ref.anomaly_maps.numpy(), atol=1e-4, rtol=0)


def test_tokenclip_graph_runs_a_fixed_number_of_sinkhorn_iterations(exported):
    det, result, check = exported["tokenclip"]
    assert result.manifest.data["fixed_graph"] == {"sinkhorn_iterations": det.ot_iters}
    assert det.ot_tol > 0  # the eager detector (the reference) keeps its early stop
    assert "Sinkhorn" in check.reference


def test_verify_catches_a_graph_that_differs(exported, tmp_path):
    """The parity check is not vacuous: the same file against a changed detector fails."""
    _, result, _ = exported["winclip-0shot"]
    other = tiny_detector("winclip", image_size=SIZE, temperature=0.5)
    check = ex.verify(other, result.path, _images(2), class_name="bottle")
    assert not check.passed
    assert check.max_score_diff > 1e-3
    assert "BEYOND" in check.summary()


def test_manifest_content(exported):
    _, result, check = exported["winclip-1shot"]
    data = result.manifest.data
    assert data["format"] == "clipad-onnx" and data["schema"] == 1
    assert data["method"] == "winclip" and data["backbone"] == "tiny" and data["pretrained"] is None
    assert data["class_name"] == "bottle" and data["shots"] == 1 and data["image_size"] == SIZE
    assert data["options"]["scales"] == [2, 3] and data["options"]["precision"] == "fp32"
    assert data["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                             "height": SIZE, "width": SIZE, "range": [0, 255]}
    assert data["outputs"] == ["pred_score", "anomaly_map"]  # no thresholds: no labels or masks
    assert data["thresholds"] is None and data["opset"] == ex.DEFAULT_OPSET
    assert data["verification"]["max_score_diff"] == check.max_score_diff
    # one manifest, twice: in the model's metadata and beside it
    import onnx

    embedded = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}[mf.METADATA_KEY]
    assert json.loads(embedded) == json.loads(mf.sidecar_path(result.path).read_text())
    # the graph's input and outputs are the ones declared
    runtime = OnnxDetector(result.path)
    assert [i.name for i in runtime.session.get_inputs()] == ["image"]
    assert runtime.session.get_inputs()[0].shape[1:] == [SIZE, SIZE, 3]


def test_thresholds_become_label_and_mask_outputs(tmp_path):
    det = tiny_detector("anomalyclip", image_size=SIZE)
    imgs = _images(6, seed=3)
    raw = det.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    s = np.sort(raw.image_scores.numpy())
    m = raw.anomaly_maps.numpy()
    # thresholds between observed values (none sits on a threshold), with anomalib's normalisation
    det.set_thresholds(Thresholds(image=float((s[2] + s[3]) / 2), pixel=float(np.median(m)) + 1e-3,
                                  image_range=(float(s[0]), float(s[-1])), pixel_range=(float(m.min()), float(m.max())),
                                  provenance={"strategy": "test"}), class_name="bottle")
    result, check = ex.export_and_verify(det, tmp_path / "th.onnx", class_name="bottle", verify_images=imgs)
    print(f"thresholds: {check.summary()}")
    assert result.manifest.outputs == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    th = result.manifest.data["thresholds"]
    assert th["image_threshold"] == 0.5 and th["pixel_threshold"] == 0.5  # normalised outputs
    assert th["provenance"] == {"strategy": "test"}
    assert check.passed and check.label_agreement == 1.0 and check.mask_agreement > 0.999
    ref = det.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2), class_name="bottle")
    runtime = OnnxDetector(result.path)
    got = runtime.predict(list(imgs))
    np.testing.assert_array_equal(got.labels, ref.labels.numpy())
    assert 0 < got.labels.sum() < len(imgs)
    assert (got.masks == ref.masks.numpy()).mean() > 0.999
    assert runtime.thresholds_for("bottle").image == th["image"]
    # the graph's own decision outputs (anomalib's names) hold the same labels
    raw_out = runtime.run(runtime.model_input(list(imgs)))
    np.testing.assert_array_equal(raw_out["pred_label"], ref.labels.numpy())
    # an override decides in output units, as Detector.predict's
    assert runtime.predict(list(imgs), threshold=2.0).labels.sum() == 0
    # a class without thresholds exports no decision outputs
    plain, _ = ex.export_and_verify(det, tmp_path / "plain.onnx", class_name="screw")
    assert plain.manifest.outputs == ["pred_score", "anomaly_map"] and plain.manifest.data["thresholds"] is None


def test_test_time_adaptation_is_refused(tmp_path):
    det = tiny_detector("anoclip", image_size=SIZE, tta=True)
    with pytest.raises(InvalidValueError, match="test-time adaptation"):
        ex.export_onnx(det, tmp_path / "tta.onnx")
    assert not (tmp_path / "tta.onnx").exists()
    code, _, err = _run(["export", "--method", "anoclip", "--tta", "--backbone", "tiny", "--image-size", str(SIZE),
                         "--out", str(tmp_path / "tta.onnx")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "test-time adaptation" in err


@pytest.mark.parametrize("method,why", [("anomalydino", "PCA"), ("musc", "transductive"), ("adaclip", "k-means")])
def test_methods_without_a_fixed_graph_are_refused(tmp_path, method, why):
    det = tiny_detector(method, image_size=SIZE)
    with pytest.raises(InvalidValueError, match=why):
        ex.export_onnx(det, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    code, _, err = _run(["export", "--method", method, "--backbone", "tiny", "--image-size", str(SIZE),
                         "--out", str(tmp_path / "m.onnx")])
    errors = [line for line in err.strip().splitlines() if not line.startswith("clipad: note:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("clipad: cannot export") and why in errors[0], err


def test_float_input_model_resizes_as_predict_does(tmp_path):
    """Other sizes: the runtime's bicubic (Pillow "F") and bilinear map resizing are torch's."""
    det = tiny_detector("anomalyclip", image_size=SIZE)
    result = ex.export_onnx(det, tmp_path / "f.onnx", input_format="float")
    assert result.manifest.data["input"]["layout"] == "NCHW"
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (100, 90))]
    got = OnnxDetector(result.path).predict(imgs + [imgs[0].astype(np.float32) / 255])
    ref = det.predict([torch.from_numpy(i).permute(2, 0, 1) for i in imgs + [imgs[0]]])
    assert [m.shape for m in got.anomaly_maps] == [(50, 70), (100, 90), (50, 70)]
    np.testing.assert_allclose(got.image_scores, ref.image_scores.numpy(), atol=1e-4, rtol=0)
    for a, b in zip(got.anomaly_maps, ref.anomaly_maps):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=0)


def test_runtime_rejects_bad_input_clearly(exported, tmp_path):
    _, result, _ = exported["winclip-0shot"]
    det = OnnxDetector(result.path)
    with pytest.raises(InvalidTypeError, match="dtype int32"):
        det.predict(np.zeros((SIZE, SIZE, 3), np.int32))
    with pytest.raises(InvalidValueError, match="0..255 pixel values"):
        det.predict(np.full((SIZE, SIZE, 3), 200.0, np.float32))
    with pytest.raises(InvalidValueError, match=r"RGB array \[H, W, 3\]"):
        det.predict(np.zeros((3, SIZE, SIZE), np.uint8))
    with pytest.raises(InvalidValueError, match="NaN"):
        det.predict(np.full((SIZE, SIZE, 3), np.nan, np.float32))
    with pytest.raises(InvalidValueError, match=r"takes uint8 \[B, 64, 64, 3\]"):
        det.run(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(InvalidValueError, match="exported for class 'bottle'"):
        det.predict(np.zeros((SIZE, SIZE, 3), np.uint8), class_name="screw")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ImageReadError, match="broken.png"):
        det.predict([broken])
    with pytest.raises(MissingFileError):
        OnnxDetector(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InvalidValueError, match="not a readable ONNX model"):
        OnnxDetector(tmp_path / "junk.onnx")
    import onnx

    model = onnx.load(str(result.path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(MissingFileError, match="no clipad metadata"):
        OnnxDetector(tmp_path / "bare.onnx")
    mf.sidecar_path(tmp_path / "bare.onnx").write_bytes(mf.sidecar_path(result.path).read_bytes())
    assert OnnxDetector(tmp_path / "bare.onnx").name == "winclip"  # the sidecar serves


_NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from clipad.deploy import OnnxDetector
from clipad.cli import main
det = OnnxDetector(sys.argv[1])
pred = det.predict(sys.argv[2:], class_name="bottle")
code = main(["predict", "--model", sys.argv[1], *sys.argv[2:], "--out", sys.argv[1] + ".out", "--quiet", "--save-maps"])
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None
                and (m == "torch" or m.startswith(("torch.", "clipad.methods", "clipad.backbones"))))
print(json.dumps({"scores": pred.image_scores.tolist(), "code": code, "loaded": loaded,
                  "torch": sys.modules["torch"] is None}))
"""


def test_runtime_runs_without_torch(exported, tmp_path):
    det, result, _ = exported["adaptclip-1shot"]
    imgs = _images(3, seed=7)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, str(result.path), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is True and out["loaded"] == [] and out["code"] == 0
    ref = det.predict([str(p) for p in paths], class_name="bottle")
    np.testing.assert_allclose(out["scores"], ref.image_scores.numpy(), atol=1e-4, rtol=0)
    # clipad predict --model wrote what clipad predict writes
    with open(str(result.path) + ".out/scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["heatmap"] for r in rows] == [f"heatmaps/img{i}.png" for i in range(3)]
    np.testing.assert_allclose([float(r["score"]) for r in rows], ref.image_scores.numpy(), atol=1e-4, rtol=0)
    saved = np.load(str(result.path) + ".out/maps/img0.npy")
    np.testing.assert_allclose(saved, ref.anomaly_maps[0].numpy(), atol=1e-4, rtol=0)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_export_then_predict(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(_images(2, seed=11, size=(80, 90))):
        Image.fromarray(img).save(good / f"{i}.png")
    model = tmp_path / "m" / "w.onnx"
    fast = ["--backbone", "tiny", "--image-size", str(SIZE)]
    code, out, err = _run(["export", "--method", "winclip", *fast, "--class-name", "bottle", "--reference", str(good),
                           "--out", str(model), "--verify", "3", "--input", "float"])
    assert code == 0, err
    assert "class 'bottle', 2-shot" in out and "within tolerance 0.0001" in out
    assert model.is_file() and mf.sidecar_path(model).is_file()
    code, out, err = _run(["predict", str(good), "--model", str(model), "--out", str(tmp_path / "onnx_out"), "--quiet"])
    assert code == 0, err
    code, _, err = _run(["predict", str(good), "--method", "winclip", *fast, "--class-name", "bottle", "--out",
                         str(tmp_path / "torch_out"), "--quiet", "--reference", str(good)])
    assert code == 0, err

    def scores(d):
        with open(tmp_path / d / "scores.csv", newline="") as f:
            return [(r["path"], float(r["score"]), r["heatmap"]) for r in csv.DictReader(f)]

    a, b = scores("onnx_out"), scores("torch_out")
    assert [r[0] for r in a] == [r[0] for r in b] and [r[2] for r in a] == [r[2] for r in b]
    np.testing.assert_allclose([r[1] for r in a], [r[1] for r in b], atol=2e-6 + 1e-4, rtol=0)
    # what an exported model fixes cannot be given again
    code, _, err = _run(["predict", str(good), "--model", str(model), "--method", "anoclip"])
    assert code == 2 and "not allowed with --model" in err
    code, _, err = _run(["predict", str(good), "--model", str(model), "--class-name", "screw", "--out", str(tmp_path / "x")])
    assert code == 2 and "exported for class 'bottle'" in err


def test_export_arguments_are_checked(tmp_path):
    det = tiny_detector("winclip", image_size=SIZE)
    with pytest.raises(InvalidValueError, match="input_format"):
        ex.export_onnx(det, tmp_path / "a.onnx", input_format="uint16")
    with pytest.raises(InvalidValueError, match="opset"):
        ex.export_onnx(det, tmp_path / "a.onnx", opset=11)
    code, _, err = _run(["export", "--method", "winclip", "--out", str(tmp_path / "a.onnx"), "--compile"])
    assert code == 2 and "--compile" in err
    assert not os.path.exists(tmp_path / "a.onnx")
