"""The inspection page in a real browser: headless Chromium, driven over the DevTools protocol.

The server runs on 127.0.0.1 (uvicorn in a thread, a free port); Chromium is Debian's
``/usr/bin/chromium`` (or ``$CLIPAD_CHROMIUM``), started with every background service off
and a host resolver that maps every name but 127.0.0.1 to nothing, so it talks to nothing but
the server. The DevTools protocol is spoken through a ~60-line WebSocket client on the
standard library, so the test needs no browser-automation package and no browser download.

``CLIPAD_SCREENSHOT=docs/serve_page.png pytest tests/integration/serve/test_serve_browser.py`` also saves a
screenshot of the page with its results. Without Chromium the test is skipped, unless
``CLIPAD_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi", reason="clipad serve needs the 'serve' extra (fastapi, uvicorn, python-multipart)")
pytest.importorskip("uvicorn", reason="clipad serve needs the 'serve' extra (fastapi, uvicorn, python-multipart)")
pytest.importorskip("multipart", reason="python-multipart is needed for file uploads")

import clipad  # noqa: E402
from clipad.serve.app import background_server, create_app  # noqa: E402

CHROMIUM = (shutil.which(os.environ["CLIPAD_CHROMIUM"]) if os.environ.get("CLIPAD_CHROMIUM")
            else shutil.which("chromium") or shutil.which("chromium-browser"))
TIMEOUT_S = 60.0


# ------------------------------------------------------------------------------ DevTools client


class _WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, client masking, pings."""

    def __init__(self, url: str, timeout: float) -> None:
        assert url.startswith("ws://")
        hostport, _, path = url[len("ws://"):].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            response += chunk
        if b" 101 " not in response.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {response[:200]!r}")
        self.buffer = response.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


class _Page:
    """One browser tab: ``call(method, **params)`` returns the command's result."""

    def __init__(self, ws_url: str) -> None:
        self.ws = _WebSocket(ws_url, timeout=TIMEOUT_S)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        status = self.evaluate("document.getElementById('status') && document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}")


def _start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
        "--no-default-browser-check", "--metrics-recording-only", "--password-store=basic",
        "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
        # Belt and braces: no name resolves, and no address but loopback is used.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        f"--user-data-dir={profile}", "--window-size=1200,760", "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        if port_file.exists() and len(port_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("chromium did not open its DevTools port")
    port = int(port_file.read_text().splitlines()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        pages = [t for t in json.load(r) if t["type"] == "page"]
    return proc, pages[0]["webSocketDebuggerUrl"]


# ------------------------------------------------------------------------------ the test


def _part_image(seed: int, defect: bool) -> Image.Image:
    """A grey 'part' on a dark background, optionally with a scratch."""
    rng = np.random.default_rng(seed)
    base = (40 + rng.normal(0, 4, (240, 320, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((50, 40, 270, 200), radius=30, fill=(170, 172, 178))
    draw.ellipse((130, 85, 190, 145), fill=(95, 97, 102))
    if defect:
        draw.line((70, 170, 120, 150), fill=(60, 30, 20), width=5)
    return image


def test_page_scores_an_uploaded_image(tmp_path, one_thread):
    if CHROMIUM is None:
        message = "headless browser test needs Chromium (apt-get install -y chromium, or set CLIPAD_CHROMIUM)"
        if os.environ.get("CLIPAD_REQUIRE_BROWSER") == "1":  # CI: a missing browser is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = clipad.create_detector("winclip", backbone="tiny", image_size=64, device="cpu")
    images = []
    for i, defect in enumerate([False, True]):
        path = tmp_path / f"part_{'scratch' if defect else 'good'}_{i}.png"
        _part_image(i, defect).save(path)
        images.append(path)
    expected = det.predict([Image.open(p).convert("RGB") for p in images]).image_scores.tolist()

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    # A threshold between the two scores, so the page shows both decisions (random weights: the
    # scores mean nothing, the test is about the page showing them).
    threshold = round(float(np.mean(expected)), 4)
    with background_server(create_app(det, threshold=threshold)) as url:
        proc, ws_url = _start_chromium(profile)
        try:
            page = _Page(ws_url)
            page.call("Emulation.setDeviceMetricsOverride", width=1100, height=640, deviceScaleFactor=1, mobile=False)
            page.call("Page.enable")
            page.call("Page.navigate", url=url + "/")
            page.wait_for("document.readyState === 'complete' && document.getElementById('info').textContent.includes('winclip')",
                          "the page to load and show /v1/info")
            root = page.call("DOM.getDocument")["root"]["nodeId"]
            node = page.call("DOM.querySelector", nodeId=root, selector="#images")["nodeId"]
            page.call("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in images])
            state = page.wait_for(
                """(() => {
                    const cards = [...document.querySelectorAll('#results .card')];
                    const ok = cards.length === 2 && cards.every(c => {
                        const img = c.querySelector('img.overlay');
                        return img && img.complete && img.naturalWidth > 0;
                    });
                    return ok ? cards.map(c => ({
                        name: c.querySelector('.name').textContent,
                        score: c.querySelector('.score').textContent,
                        decision: (c.querySelector('.decision') || {}).textContent,
                        overlay: [c.querySelector('img.overlay').naturalWidth, c.querySelector('img.overlay').naturalHeight],
                        original: c.querySelector('img.original').naturalWidth,
                    })) : null;
                })()""",
                "two result cards with a heatmap and a score",
            )
            for card, path, want in zip(state, images, expected):
                assert card["name"] == path.name
                assert card["overlay"] == [320, 240] and card["original"] == 320  # heatmap at the image's size
                shown = float(card["score"].removeprefix("score "))
                assert abs(shown - want) < 1e-4  # shown with 4 decimals
                assert card["decision"] == ("anomalous" if want >= threshold else "normal")
            shot_path = os.environ.get("CLIPAD_SCREENSHOT")
            if shot_path:
                data = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
                shot = Image.open(io.BytesIO(data)).convert("RGB")
                # Palette PNG: a screenshot of flat UI plus two photos stays well under 300 KB.
                shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(shot_path, optimize=True)
            page.ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
