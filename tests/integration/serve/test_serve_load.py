"""Load test of ``clipad serve`` on loopback: 500 requests from 16 concurrent clients.

The server is a separate process (``python -m clipad.serve``, as a user would run it), so the
client's work does not compete with it for the GIL. Every answer is checked against
``det.predict`` on the same image, none may be lost, and the server must have batched
(some model call held more than one image). Latency p50/p99 and requests/s are printed; they
are reported, never asserted (tests do not time things).
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import time
import warnings

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="clipad serve needs the 'serve' extra (fastapi, uvicorn, python-multipart, httpx)")
pytest.importorskip("uvicorn", reason="clipad serve needs the 'serve' extra")
pytest.importorskip("multipart", reason="python-multipart is needed for file uploads")
httpx = pytest.importorskip("httpx", reason="the load test's client is httpx")

import clipad  # noqa: E402
from _helpers import start_tiny_server

N_REQUESTS = int(os.environ.get("CLIPAD_LOAD_REQUESTS", "500"))
N_CLIENTS = 16
N_IMAGES = 12
STARTUP_TIMEOUT_S = 120.0


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (80, 60), (96, 96), (48, 72)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for i in range(N_IMAGES)
            for (w, h) in [sizes[i % len(sizes)]]]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _start_server() -> tuple[subprocess.Popen, str, list[str]]:
    return start_tiny_server(["--max-batch", "16", "--max-wait-ms", "5"], env={"CLIPAD_TOKEN": "load-test-token"},
                             timeout_s=STARTUP_TIMEOUT_S)


async def _run_load(url: str, payloads: list[bytes], headers: dict) -> tuple[list, float]:
    results: list = [None] * N_REQUESTS
    counter = iter(range(N_REQUESTS))
    limits = httpx.Limits(max_connections=N_CLIENTS, max_keepalive_connections=N_CLIENTS)

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60.0) as client:
        # Wait for readiness through the API, not only the log line.
        for _ in range(200):
            if (await client.get("/v1/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)

        async def worker() -> None:
            for i in counter:
                k = i % len(payloads)
                maps = "overlay" if i % 25 == 0 else "none"  # some answers carry PNGs too
                t0 = time.perf_counter()
                r = await client.post("/v1/predict", files=[("files", (f"img{k}.png", payloads[k], "image/png"))],
                                      data={"maps": maps})
                results[i] = (k, r.status_code, r.json(), time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(N_CLIENTS)))
        wall = time.perf_counter() - t0
        info = (await client.get("/v1/info")).json()
    return results, wall, info


def test_load_500_requests_16_clients(capsys):
    images = _images()
    payloads = [_png(im) for im in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = clipad.create_detector("winclip", backbone="tiny", image_size=64, device="cpu")
    expected = [float(det.predict([im]).image_scores[0]) for im in images]
    del det

    proc, url, log = _start_server()
    try:
        results, wall, info = asyncio.run(_run_load(url, payloads, {"Authorization": "Bearer load-test-token"}))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    assert all(r is not None for r in results), "some requests were lost"
    bad = [(i, r[1], r[2]) for i, r in enumerate(results) if r[1] != 200]
    assert not bad, f"{len(bad)} failed requests, e.g. {bad[:3]}"
    for i, (k, _, body, _) in enumerate(results):
        (res,) = body["results"]
        assert res["name"] == f"img{k}.png"
        assert abs(res["score"] - expected[k]) < 1e-5, (i, k, res["score"], expected[k])
        assert (res["width"], res["height"]) == images[k].size
        assert ("overlay_png" in res) == (i % 25 == 0)

    batching = info["batching"]
    assert batching["images"] >= N_REQUESTS  # + the warm-up call
    assert batching["max_batch_size"] > 1, f"no request was batched with another: {batching}"

    latency = np.array([r[3] for r in results]) * 1000.0
    with capsys.disabled():
        print(f"\nclipad serve load test (winclip, tiny, 64 px, CPU, {os.cpu_count()} cores): "
              f"{N_REQUESTS} requests from {N_CLIENTS} clients in {wall:.2f} s = {N_REQUESTS / wall:.1f} req/s; "
              f"latency p50 {np.percentile(latency, 50):.1f} ms, p99 {np.percentile(latency, 99):.1f} ms, "
              f"max {latency.max():.1f} ms; {batching['batches']} model calls, "
              f"mean batch {batching['mean_batch_size']:.2f}, max batch {batching['max_batch_size']}")
