"""Resource budgets of ``clipad serve``: decode amplification cannot exhaust the server's memory.

The attack: PNGs of ~47 KB each declaring 6000x6000 pixels (36 MP; ~1 GB each once decoded and
scored), many per request and in concurrent requests. Each defence is checked where it acts:

- a real server process (``python -m clipad.serve``, default budgets) under the attack: every
  such request is refused with 413 from the image headers, the server's RSS (``/proc/<pid>``)
  grows by less than :data:`RSS_BOUND_MB` during and after, and a normal request right after
  gets its correct score; a watchdog kills the server if it runs away, so a regression fails
  the test instead of exhausting the runner;
- the in-flight budget, in process with a held model call: requests that do not fit are refused
  with 503 and ``Retry-After`` once their wait is over, one that fits is admitted, and the
  budget's peak never exceeds its limit;
- the pieces: :class:`PixelBudget` (first come first served, timeouts, cancellation),
  :func:`check_request`'s message, the batcher holding no finished batch, the per-call pixel cap,
  banded overlays equal to whole ones, and the CLI flags' validation.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import os
import subprocess
import threading
import time
import warnings
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="clipad serve needs the 'serve' extra (fastapi, uvicorn, python-multipart, httpx)")
pytest.importorskip("uvicorn", reason="clipad serve needs the 'serve' extra")
pytest.importorskip("multipart", reason="python-multipart is needed for file uploads")
httpx = pytest.importorskip("httpx", reason="the tests' client is httpx")

from fastapi.testclient import TestClient  # noqa: E402

import clipad  # noqa: E402
from clipad.cli import main as clipad_main  # noqa: E402
from clipad.errors import InvalidValueError  # noqa: E402
from clipad.eval.viz import overlay  # noqa: E402
from clipad.serve import images as serve_images  # noqa: E402
from clipad.serve.app import background_server, create_app  # noqa: E402
from clipad.serve.batcher import Batcher, predict_groups  # noqa: E402
from clipad.serve.budget import PixelBudget, RequestTooLarge, ServerBusy, check_request  # noqa: E402
from _helpers import start_tiny_server

#: Most the server's RSS may grow (peak during the attack, and after it) over its RSS before.
#: Unbounded, one 6000x6000 bomb alone costs ~1 GB and a request of 20 of them ~20 GB.
RSS_BOUND_MB = 300.0
#: Growth at which the watchdog kills the server (a regression: fail, do not exhaust the runner).
RUNAWAY_MB = 2000.0

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc (Linux)")


def _tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clipad.create_detector("winclip", backbone="tiny", image_size=64, device="cpu")


@pytest.fixture(scope="module")
def det(one_thread):
    return _tiny()


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _bomb(side: int = 6000) -> bytes:
    """A solid grey PNG declaring side x side pixels: ~47 KB for 6000 (zlib of a constant)."""
    return _png(Image.new("L", (side, side), 200), optimize=True)


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image (compresses well: a 1000x1000 upload of tens of KB, not 3 MB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [127 + 120 * np.sin(x / rng.uniform(20, 60) + y / rng.uniform(20, 60) + k) for k in range(3)]
    return Image.fromarray(np.stack(chans, -1).astype(np.uint8))


def _files(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "image/png")) for name, data in items]


def _mem_mb(pid: int | str = "self") -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def _reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssWatch:
    """Samples a process's RSS every 20 ms; kills it when it grows by more than ``kill_mb``."""

    def __init__(self, pid: int, base_mb: float, kill_mb: float | None = None) -> None:
        self.pid, self.base, self.kill_mb = pid, base_mb, kill_mb
        self.peak = base_mb
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                rss = _mem_mb(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.peak = max(self.peak, rss)
            if self.kill_mb is not None and rss - self.base > self.kill_mb:
                self.killed = True
                os.kill(self.pid, 9)
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def _start_server(extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    proc, url, _ = start_tiny_server(extra, env={"OMP_NUM_THREADS": "1"})
    return proc, url


# --------------------------------------------------------------------------- the attack, end to end


@needs_proc
def test_bomb_requests_are_refused_from_headers_and_rss_stays_bounded(det):
    bomb = _bomb(6000)
    assert len(bomb) < 100_000  # ~47 KB declaring 36 MP: 20 of them are under 1 MB of upload
    normal = [_rgb(64, 48, 0), _rgb(80, 60, 1)]
    expected = det.predict(normal).image_scores
    proc, url = _start_server()
    try:
        with httpx.Client(base_url=url, timeout=60.0) as client:
            def predict(files):
                return client.post("/v1/predict", files=files, data={"maps": "none"})

            for _ in range(2):  # warm-up: the first requests allocate the server's steady state
                assert predict(_files(("n0.png", _png(normal[0])), ("n1.png", _png(normal[1])))).status_code == 200
            base = _mem_mb(proc.pid)["VmRSS"]
            hwm_reset = _reset_peak(proc.pid)
            with _RssWatch(proc.pid, base, kill_mb=RUNAWAY_MB) as watch:
                # one request of 20 bombs
                try:
                    r = predict(_files(*[(f"bomb{i}.png", bomb) for i in range(20)]))
                except httpx.HTTPError:
                    if watch.killed:
                        pytest.fail(f"server RSS grew by more than {RUNAWAY_MB:.0f} MB: killed by the watchdog")
                    raise
                assert r.status_code == 413, r.text[:300]
                detail = r.json()["detail"]
                for part in ("bomb1.png", "6000x6000", "36.0 MP", "72.0 MP", "64 MP", "--max-request-pixels"):
                    assert part in detail, (part, detail)
                # concurrent requests of bombs (each over the per-request budget)
                with concurrent.futures.ThreadPoolExecutor(6) as pool:
                    answers = list(pool.map(
                        lambda k: httpx.post(url + "/v1/predict", timeout=60.0,
                                             files=_files(*[(f"c{k}-{i}.png", bomb) for i in range(2 + k)])),
                        range(6)))
                assert [a.status_code for a in answers] == [413] * 6, [a.text[:200] for a in answers]
                time.sleep(0.3)
            assert not watch.killed, f"server RSS grew by more than {RUNAWAY_MB:.0f} MB: killed by the watchdog"
            mem = _mem_mb(proc.pid)
            peak = max(watch.peak, mem["VmHWM"] if hwm_reset else 0.0)
            print(f"\nbomb attack on clipad serve: RSS before {base:.0f} MB, peak {peak:.0f} MB "
                  f"(+{peak - base:.0f}), after {mem['VmRSS']:.0f} MB (+{mem['VmRSS'] - base:.0f})")
            assert peak - base < RSS_BOUND_MB, f"RSS grew by {peak - base:.0f} MB during the attack"
            assert mem["VmRSS"] - base < RSS_BOUND_MB, f"RSS stayed {mem['VmRSS'] - base:.0f} MB higher after the attack"

            # The server goes on serving, with correct scores.
            r = predict(_files(("n0.png", _png(normal[0])), ("n1.png", _png(normal[1]))))
            assert r.status_code == 200, r.text
            got = [res["score"] for res in r.json()["results"]]
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@needs_proc
def test_inflight_budget_refuses_with_503_and_admits_what_fits(one_thread):
    d = _tiny()
    mp2 = [_smooth(1000, 1000, 0), _smooth(1000, 1000, 1)]  # 2 MP per request
    mp1 = _smooth(1000, 1000, 2)
    app = create_app(d, max_request_pixels=2_000_000, max_inflight_pixels=3_000_000, inflight_wait_s=0.3)
    real_predict = d.predict
    entered, release = threading.Event(), threading.Event()

    def held_predict(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_predict(*args, **kwargs)

    encoded = {id(im): _png(im, compress_level=1) for im in (*mp2, mp1)}

    def post(url, images, prefix):
        files = _files(*[(f"{prefix}{i}.png", encoded[id(im)]) for i, im in enumerate(images)])
        return httpx.post(url + "/v1/predict", files=files, data={"maps": "none"}, timeout=60.0)

    with background_server(app) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        def budget() -> dict:
            return httpx.get(url + "/v1/info", timeout=10).json()["pixel_budget"]

        def wait_in_flight(pixels: int) -> None:
            deadline = time.monotonic() + 30
            while budget()["in_flight_pixels"] != pixels:
                assert time.monotonic() < deadline, budget()
                time.sleep(0.02)

        assert post(url, [mp1], "warm").status_code == 200
        base = _mem_mb()["VmRSS"]
        hwm_reset = _reset_peak()
        with _RssWatch(os.getpid(), base) as watch:
            d.predict = held_predict
            first = pool.submit(post, url, mp2, "first")  # 2 MP: admitted, then held in the model call
            assert entered.wait(30)
            wait_in_flight(2_000_000)
            fits = pool.submit(post, url, [mp1], "fits")  # 2 + 1 <= 3 MP: admitted at once
            wait_in_flight(3_000_000)
            t0 = time.monotonic()
            busy = [f.result() for f in [pool.submit(post, url, mp2, f"busy{k}-") for k in range(4)]]
            waited = time.monotonic() - t0
            info = budget()
            release.set()
            r_first, r_fits = first.result(), fits.result()
            d.predict = real_predict
        for r in busy:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            detail = r.json()["detail"]
            for part in ("busy", "3.0 MP", "in flight", "2.0 MP more", "--max-inflight-pixels", "retry later"):
                assert part in detail, (part, detail)
        assert waited >= 0.3  # they waited for room before giving up
        assert info["in_flight_pixels"] == 3_000_000 and info["refused_busy"] == 4
        assert info["peak_in_flight_pixels"] <= 3_000_000
        assert r_first.status_code == 200 and r_fits.status_code == 200, (r_first.text, r_fits.text)
        want = real_predict(mp2).image_scores.numpy()
        np.testing.assert_allclose([x["score"] for x in r_first.json()["results"]], want, atol=1e-5)
        # Room again: the same 2 MP request is served now, and the budget is empty afterwards.
        r = post(url, mp2, "after")
        assert r.status_code == 200
        np.testing.assert_allclose([x["score"] for x in r.json()["results"]], want, atol=1e-5)
        final = budget()
        assert final["in_flight_pixels"] == 0 and final["peak_in_flight_pixels"] <= 3_000_000
    peak = max(watch.peak, _mem_mb()["VmHWM"] if hwm_reset else 0.0)
    assert peak - base < RSS_BOUND_MB, f"RSS grew by {peak - base:.0f} MB"


def test_request_budget_covers_references_and_names_the_file(det):
    one_mp = _png(Image.new("RGB", (1000, 1000), (90, 120, 150)))
    with TestClient(create_app(det, max_request_pixels=1_500_000, max_inflight_pixels=1_500_000)) as c:
        r = c.post("/v1/references/bottle", files=_files(("g0.png", one_mp), ("g1.png", one_mp)))
        assert r.status_code == 413
        assert "g1.png" in r.json()["detail"] and "--max-request-pixels" in r.json()["detail"]
        assert c.get("/v1/references").json()["classes"] == {}
        r = c.post("/v1/references/bottle", files=_files(("g0.png", one_mp)))
        assert r.status_code == 200 and r.json()["shots"] == 1
        info = c.get("/v1/info").json()
        assert info["max_request_pixels"] == 1_500_000 and info["pixel_budget"]["in_flight_pixels"] == 0


def test_per_image_limit_names_the_flag(det):
    with TestClient(create_app(det, max_image_pixels=10_000_000)) as c:
        r = c.post("/v1/predict", files=_files(("big.png", _bomb(4000))))
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "big.png" in detail and "4000x4000" in detail and "--max-image-pixels" in detail


@pytest.mark.parametrize("kwargs, flag", [
    ({"max_request_pixels": 0}, "--max-request-pixels"),
    ({"max_inflight_pixels": -1}, "--max-inflight-pixels"),
    ({"max_image_pixels": 0}, "--max-image-pixels"),
    ({"max_request_pixels": 10, "max_inflight_pixels": 5}, "--max-inflight-pixels"),
])
def test_create_app_rejects_bad_budgets(det, kwargs, flag):
    with pytest.raises(InvalidValueError, match=flag):
        create_app(det, **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--max-request-pixels", "0"], "--max-request-pixels: must be a finite number > 0"),
    (["--max-inflight-pixels", "nan"], "--max-inflight-pixels: must be a finite number > 0"),
    (["--max-image-pixels", "-5"], "--max-image-pixels: must be a finite number > 0"),
    (["--max-request-pixels", "300"], "is over --max-inflight-pixels"),
])
def test_cli_validates_budget_flags(capsys, argv, message):
    assert clipad_main(["serve", "--backbone", "tiny", "--pretrained", "none", *argv]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- the pieces


def test_check_request_sums_and_names_the_file_over_budget():
    assert check_request([("a", 100, 100), ("b", 50, 20)], 11_000) == 11_000
    with pytest.raises(RequestTooLarge) as info:
        check_request([("a.png", 4000, 4000), ("b.png", 5000, 10000), ("c.png", 1, 1)], 64_000_000)
    msg = str(info.value)
    assert "'b.png'" in msg and "5000x10000" in msg and "66.0 MP" in msg and "64 MP" in msg
    assert "--max-request-pixels" in msg and "c.png" not in msg


def test_pixel_budget_waits_first_come_first_served_and_times_out():
    async def scenario():
        b = PixelBudget(10, wait_s=5.0)
        await b.acquire(6)
        big = asyncio.ensure_future(b.acquire(8))   # waits: 6 + 8 > 10
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(b.acquire(2))  # would fit, but queues behind `big`
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done() and b.in_flight == 6
        b.release(6)                                  # big (8) then small (2) fit: both admitted
        await asyncio.wait_for(asyncio.gather(big, small), 1)
        assert b.in_flight == 10 and b.peak == 10

        b.wait_s = 0.05
        with pytest.raises(ServerBusy, match="--max-inflight-pixels"):
            await b.acquire(1)
        assert b.refused == 1 and b.in_flight == 10 and not b._waiters

        # a waiter that goes away (client disconnect) leaves nothing behind
        b.wait_s = 5.0
        gone = asyncio.ensure_future(b.acquire(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert not b._waiters and b.in_flight == 10
        b.release(8)
        b.release(2)
        assert b.in_flight == 0
        async with b.hold(10):
            assert b.in_flight == 10
        assert b.in_flight == 0
        with pytest.raises(InvalidValueError, match="never fit"):
            await b.acquire(11)

    asyncio.run(scenario())


def test_batcher_keeps_no_reference_to_a_finished_batch():
    class Img:  # stands for a decoded image; weakly referencable
        width = height = 8

    def run_batch(items):
        return [(0.5, np.zeros((8, 8), np.float32)) for _ in items]

    async def scenario():
        b = Batcher(run_batch, max_batch=4, max_wait_ms=1)
        await b.start()
        try:
            img = Img()
            ref = weakref.ref(img)
            (score, _), = await b.submit([img])
            del img
            await asyncio.sleep(0.05)  # the collector is idle, waiting for the next batch
            # No gc.collect(): a finished batch must be freed by reference counting at once.
            assert ref() is None, "the batcher still holds the last batch's image"
            assert score == 0.5
        finally:
            await b.stop()

    asyncio.run(scenario())


def test_predict_groups_caps_pixels_per_model_call():
    calls = []

    class Fake:
        def predict(self, images, class_name=None, batch_size=16):
            calls.append((class_name, [im.width * im.height // 1_000_000 for im in images]))
            return SimpleNamespace(image_scores=torch.arange(len(images), dtype=torch.float32),
                                   anomaly_maps=[torch.zeros(1, 1) for _ in images])

    sizes = [3, 3, 1, 6, 1, 2]  # megapixels (width 1000 x height 1000 * n)
    items = [(Image.new("L", (1000, 1000 * n)), "a" if k != 5 else "b") for k, n in enumerate(sizes)]
    out = predict_groups(Fake(), 16, items, max_call_pixels=5_000_000)
    assert calls == [("a", [3]), ("a", [3, 1]), ("a", [6]), ("a", [1]), ("b", [2])]
    assert [s for s, _ in out] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_banded_overlay_and_in_place_map_png_equal_the_whole(monkeypatch):
    rng = np.random.default_rng(0)
    image = _rgb(300, 200, 3)
    amap = rng.random((200, 300)).astype(np.float32) * 3 - 1
    amap[5:9, 10:40] = np.nan
    whole = overlay(image, amap)
    monkeypatch.setattr(serve_images, "_BAND_PIXELS", 7000)  # 23 rows per band: 9 bands
    banded = np.asarray(Image.open(io.BytesIO(base64.b64decode(serve_images.overlay_png(image, amap)))))
    np.testing.assert_array_equal(banded, whole)

    b64, lo, hi = serve_images.map_png(amap)
    q = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    finite = amap[np.isfinite(amap)]
    assert (lo, hi) == (float(finite.min()), float(finite.max()))
    want = np.clip(np.rint((np.nan_to_num(amap, nan=lo) - lo) * (65535.0 / (hi - lo))), 0, 65535).astype(np.uint16)
    np.testing.assert_array_equal(q, want)
