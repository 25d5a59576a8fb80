"""API tests of ``clipad serve`` (in process, FastAPI's TestClient, tiny backbone at 64 px).

Expected scores and maps come from calling the detector directly: the service must give what
``det.predict`` gives for the same image, and every bad input gets its documented status.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="clipad serve needs the 'serve' extra (fastapi, uvicorn, python-multipart, httpx)")
pytest.importorskip("multipart", reason="python-multipart is needed for file uploads")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

import clipad  # noqa: E402
from clipad.serve import references as refstore  # noqa: E402
from clipad.serve.app import create_app, token_from_env  # noqa: E402
from clipad.serve.batcher import Batcher  # noqa: E402
from clipad.serve.images import load_image_bytes  # noqa: E402

SERVE_DIR = Path(clipad.__file__).parent / "serve"


def _tiny(method: str = "winclip"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clipad.create_detector(method, backbone="tiny", image_size=64, device="cpu")


@pytest.fixture(scope="module")
def det(one_thread):
    return _tiny()


def _rgb(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _files(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "image/png")) for name, data in items]


def _decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture()
def client(det):
    with TestClient(create_app(det, threshold=0.47, max_upload_mb=1)) as c:
        yield c


# ------------------------------------------------------------------------------ endpoints


def test_health_and_info(client, det):
    assert client.get("/v1/health").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    assert info["method"] == "winclip" and info["backbone"] == "tiny"
    assert info["device"] == "cpu" and info["version"] == clipad.__version__
    assert info["threshold"] == 0.47 and info["token_required"] is False


def test_predict_matches_detector(client, det):
    images = [_rgb(64, 48, 0), _rgb(80, 80, 1)]  # two sizes: maps come back at each image's size
    r = client.post("/v1/predict", files=_files(("a.png", _png(images[0])), ("b.png", _png(images[1]))),
                    data={"class_name": "bottle", "maps": "both"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class_name"] == "bottle"
    want = det.predict(images, class_name="bottle")
    for i, (res, img) in enumerate(zip(body["results"], images)):
        assert res["name"] == "ab"[i] + ".png"
        assert (res["width"], res["height"]) == img.size
        assert abs(res["score"] - float(want.image_scores[i])) < 1e-5
        assert res["decision"] == ("anomalous" if res["score"] >= 0.47 else "normal")
        overlay = _decode_png(res["overlay_png"])
        assert overlay.shape == (img.height, img.width, 3) and overlay.dtype == np.uint8
        raw = _decode_png(res["map_png"]).astype(np.float64)
        assert raw.shape == (img.height, img.width) and raw.max() > 255  # 16-bit, not 8
        recovered = res["map_min"] + raw / 65535.0 * (res["map_max"] - res["map_min"])
        np.testing.assert_allclose(recovered, want.anomaly_maps[i].numpy(), atol=2e-5 * (res["map_max"] - res["map_min"]) + 1e-7)


def test_predict_default_class_and_map_choice(client, det):
    image = _rgb(seed=3)
    body = client.post("/v1/predict", files=_files(("x.png", _png(image))), data={"maps": "none"}).json()
    assert body["class_name"] == "object"
    res = body["results"][0]
    assert "overlay_png" not in res and "map_png" not in res
    assert abs(res["score"] - float(det.predict([image]).image_scores[0])) < 1e-5


def test_references_set_used_persisted_and_reloaded(det, tmp_path):
    good = [_rgb(seed=10), _rgb(seed=11)]
    probe = _rgb(seed=12)
    evil = "..\\..\\evil: name*?"  # must never become a path (a '/' cannot reach the route at all)
    store = tmp_path / "refs"
    expected_det = _tiny()
    expected_det.set_reference(good, class_name=evil)
    want = float(expected_det.predict([probe], class_name=evil).image_scores[0])
    zero_shot = float(expected_det.predict([probe], class_name="other").image_scores[0])
    assert abs(want - zero_shot) > 1e-4  # the references change the score, so the check below means something

    app_det = _tiny()
    with TestClient(create_app(app_det, references_dir=store)) as c:
        r = c.post(f"/v1/references/{quote(evil, safe='')}", files=_files(("g0.png", _png(good[0])), ("g1.png", _png(good[1]))))
        assert r.status_code == 200, r.text
        assert r.json() == {"class_name": evil, "shots": 2, "persisted": True}
        score = c.post("/v1/predict", files=_files(("p.png", _png(probe))), data={"class_name": evil}).json()["results"][0]["score"]
        assert abs(score - want) < 1e-5
        assert c.get("/v1/references").json()["classes"] == {evil: 2}

    # On disk: one directory, safe characters only, inside the store; the exact name in class.json.
    entries = [p for p in store.iterdir()]
    assert len(entries) == 1 and entries[0].parent == store
    assert entries[0].name == refstore.class_dirname(evil)
    assert set(entries[0].name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert json.loads((entries[0] / "class.json").read_text())["class_name"] == evil
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs"]

    # A fresh server reloads them.
    with TestClient(create_app(_tiny(), references_dir=store)) as c:
        assert c.get("/v1/info").json()["references"] == {evil: 2}
        score = c.post("/v1/predict", files=_files(("p.png", _png(probe))), data={"class_name": evil}).json()["results"][0]["score"]
        assert abs(score - want) < 1e-5
        assert c.delete(f"/v1/references/{quote(evil, safe='')}").json() == {"class_name": evil, "deleted": True}
        assert c.delete(f"/v1/references/{quote(evil, safe='')}").status_code == 404
    assert list(store.iterdir()) == []


def test_references_on_zero_shot_method_is_409():
    with TestClient(create_app(_tiny("anoclip"))) as c:
        r = c.post("/v1/references/bottle", files=_files(("g.png", _png(_rgb()))))
    assert r.status_code == 409 and "no few-shot mode" in r.json()["detail"]


def test_class_dirname_is_safe_and_distinct():
    names = ["bottle", "..", ".", "a/b", "a_b", "a\\b", "/etc/passwd", "ünïcode", "", "x" * 300]
    dirs = [refstore.class_dirname(n) for n in names]
    assert len(set(dirs)) == len(dirs)
    for d in dirs:
        assert d not in (".", "..") and "/" not in d and "\\" not in d and len(d) <= 60
        assert set(d) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    for needle in ("http://", "https://", "src=\"//", "href=\"//", "@import"):
        assert needle not in html, needle
    assert 'id="images"' in html and 'id="results"' in html


# ------------------------------------------------------------------------------ bad input


def test_non_image_and_corrupt_are_400_and_server_keeps_serving(client):
    good = _png(_rgb())
    cases = {
        "notes.txt": (b"just some text", "not an image file"),
        "empty.png": (b"", "empty file"),
        "truncated.png": (good[: len(good) // 2], "truncated or corrupt"),
        "garbage.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "image"),
    }
    for name, (data, message) in cases.items():
        r = client.post("/v1/predict", files=[("files", (name, data, "application/octet-stream"))])
        assert r.status_code == 400, (name, r.text)
        detail = r.json()["detail"]
        assert name in detail and message in detail, detail
    # One bad file among good ones fails the request and names the file.
    r = client.post("/v1/predict", files=_files(("ok.png", good), ("bad.png", b"nope")))
    assert r.status_code == 400 and "bad.png" in r.json()["detail"]
    assert client.post("/v1/predict", files=_files(("ok.png", good))).status_code == 200
    assert client.get("/v1/health").status_code == 200


def test_upload_over_limit_is_413(client):
    big = b"\0" * (1024 * 1024 + 10)  # the client fixture allows 1 MiB
    r = client.post("/v1/predict", files=[("files", ("big.png", big, "image/png"))])
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]

    # Without Content-Length (chunked), the body is counted as it arrives and cut off.
    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 65536

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert client.post("/v1/predict", files=_files(("ok.png", _png(_rgb())))).status_code == 200


def test_too_many_pixels_is_413(det):
    # A small PNG declaring 25 megapixels, over a 10 MP limit: refused from its header.
    bomb = Image.new("1", (5000, 5000))
    data = _png(bomb)
    assert len(data) < 200_000
    with TestClient(create_app(det, max_image_pixels=10_000_000)) as c:
        r = c.post("/v1/predict", files=_files(("bomb.png", data)))
    assert r.status_code == 413 and "5000x5000" in r.json()["detail"]


@pytest.mark.parametrize("kwargs", [
    {"json": {"files": ["a.png"]}},                                   # JSON instead of multipart
    {"content": b"a=1", "headers": {"content-type": "application/x-www-form-urlencoded"}},
    {"content": b"x", "headers": {"content-type": "multipart/form-data"}},  # no boundary
    {"files": [("image", ("a.png", b"x", "image/png"))]},              # wrong field name
    {"data": {"files": "not a file"}, "files": [("other", ("a.png", b"x", "image/png"))]},
    {"files": [("files", ("a.png", b"x", "image/png"))], "data": {"maps": "pdf"}},
    {"files": [("files", ("a.png", b"x", "image/png"))], "data": {"class_name": "x" * 101}},
    {"files": [("files", ("a.png", b"x", "image/png"))], "data": {"class_name": "bad\x00name"}},
])
def test_wrong_content_type_or_fields_are_422(client, kwargs):
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_references_bad_input(client):
    assert client.post("/v1/references/bottle", json={}).status_code == 422
    assert client.post("/v1/references/bottle", files=[("files", ("a.txt", b"text", "text/plain"))]).status_code == 400
    assert client.post("/v1/references/%20", files=_files(("a.png", _png(_rgb())))).status_code == 422


# ------------------------------------------------------------------------------ token


def test_token_on_every_endpoint_but_health(det):
    with TestClient(create_app(det, token="s3cret")) as c:
        assert c.get("/v1/health").status_code == 200
        for method, path in [("GET", "/v1/info"), ("GET", "/"), ("GET", "/v1/references"),
                             ("POST", "/v1/predict"), ("POST", "/v1/references/bottle"), ("GET", "/openapi.json")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"]
        assert c.get("/").headers["www-authenticate"].startswith("Basic")  # browsers prompt for it
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/info", headers=ok).json()["token_required"] is True
        assert c.post("/v1/predict", headers=ok, files=_files(("a.png", _png(_rgb())))).status_code == 200
        basic = {"Authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}
        assert c.get("/", headers=basic).status_code == 200
        # Unauthenticated uploads are refused before their body is read.
        assert c.post("/v1/predict", files=[("files", ("big.png", b"\0" * (30 << 20), "image/png"))]).status_code == 401


def test_token_from_env(monkeypatch):
    monkeypatch.setenv("CLIPAD_TOKEN", "from-env")
    assert token_from_env(None) == "from-env"
    assert token_from_env("given") == "given"
    monkeypatch.setenv("CLIPAD_TOKEN", "")
    assert token_from_env(None) is None


# ------------------------------------------------------------------------------ pieces


def test_load_image_bytes_matches_load_image(tmp_path):
    image = Image.fromarray((np.random.default_rng(5).random((30, 40)) * 65535).astype(np.uint16))  # 16-bit gray
    path = tmp_path / "g16.png"
    image.save(path)
    from clipad.data.images import load_image

    a, b = load_image(path), load_image_bytes(path.read_bytes(), "g16.png")
    assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))


def test_batcher_coalesces_and_isolates_failures():
    calls: list[list] = []

    def run(items):
        calls.append([x for x, _ in items])
        return [ValueError("bad") if x == "boom" else (float(x), np.zeros((1, 1))) for x, _ in items]

    async def main():
        b = Batcher(run, max_batch=4, max_wait_ms=20)
        await b.start()
        try:
            many = b.submit(list(range(10)))
            lone = b.submit([100])
            got = await asyncio.gather(many, lone)
            with pytest.raises(ValueError):
                await b.submit(["boom"])
            after = await b.submit([7])  # the collector survived the failure
            return got, after, b.stats()
        finally:
            await b.stop()

    (many, lone), after, stats = asyncio.run(main())
    assert [s for s, _ in many] == list(map(float, range(10))) and lone[0][0] == 100.0 and after[0][0] == 7.0
    assert [len(c) for c in calls[:3]] == [4, 4, 3]  # 10 + 1 images queued together: full batches
    assert stats["max_batch_size"] == 4 and stats["images"] == 13


def test_serve_parser_defaults(tmp_path):
    from clipad.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--backbone", "tiny"])
    assert (args.host, args.port, args.max_batch, args.max_upload_mb, args.token, args.threshold) == (
        "127.0.0.1", 8000, 16, 20.0, None, None)
    ckpt = tmp_path / "c.safetensors"  # --checkpoint must exist, and belong to the method
    ckpt.touch()
    args = parser.parse_args(["serve", "--method", "anomalyclip", "--checkpoint", str(ckpt), "--references-dir", "r",
                              "--threshold", "0.3"])
    assert (args.checkpoint, args.references_dir, args.threshold) == (str(ckpt), "r", 0.3)


def test_no_pickle_in_the_service():
    for path in SERVE_DIR.glob("*.py"):
        text = path.read_text()
        for needle in ("import pickle", "torch.load", "np.load", "allow_pickle"):
            assert needle not in text, (path.name, needle)


def test_raw_map_png_roundtrip():
    from clipad.serve.images import map_png

    amap = torch.rand(13, 17).numpy() * 3 - 1
    b64, lo, hi = map_png(amap)
    raw = _decode_png(b64).astype(np.float64)
    np.testing.assert_allclose(lo + raw / 65535 * (hi - lo), amap, atol=(hi - lo) / 65535)


def test_model_calls_do_not_block_the_event_loop():
    """While a model call is stuck, the server still answers other requests."""
    import concurrent.futures
    import threading

    import httpx

    from clipad.serve.app import background_server

    d = _tiny()
    release, entered = threading.Event(), threading.Event()
    real_predict = d.predict

    def held_predict(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_predict(*args, **kwargs)

    with background_server(create_app(d)) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        d.predict = held_predict  # after the warm-up call
        pending = pool.submit(httpx.post, url + "/v1/predict", files=_files(("a.png", _png(_rgb()))), timeout=30)
        assert entered.wait(30)
        try:
            assert httpx.get(url + "/v1/health", timeout=5).status_code == 200
            assert httpx.get(url + "/v1/info", timeout=5).json()["batching"]["batches"] >= 1
            assert httpx.post(url + "/v1/predict", files=_files(("bad.png", b"no")), timeout=5).status_code == 400
        finally:
            release.set()
        assert pending.result().status_code == 200


def test_full_queue_is_503(det):
    with TestClient(create_app(det, max_queue=0)) as c:
        r = c.post("/v1/predict", files=_files(("a.png", _png(_rgb()))))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
