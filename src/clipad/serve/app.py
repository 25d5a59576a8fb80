"""The ASGI application of ``clipad serve``: HTTP endpoints around one detector.

Endpoints (JSON unless noted; every one but ``/v1/health`` needs the token when one is set)::

    GET    /                            the inspection page (self-contained HTML)
    GET    /v1/health                   {"status": "ok"}; never needs the token
    GET    /v1/info                     method, backbone, device, version, limits, batch stats
    POST   /v1/predict                  multipart: files (repeatable), class_name?, maps?
    GET    /v1/references               {"classes": {name: shots}}
    POST   /v1/references/{class_name}  multipart: files (repeatable) -> k-shot references
    DELETE /v1/references/{class_name}

Request handling is asynchronous throughout: uploads are decoded and answers encoded on
worker threads, model calls go through the :class:`~clipad.serve.batcher.Batcher`'s single
model thread, and the event loop only moves bytes.

Example (a test, or a notebook)::

    det = clipad.create_detector("winclip", backbone="tiny", image_size=64, device="cpu")
    with fastapi.testclient.TestClient(create_app(det)) as client:
        client.post("/v1/predict", files={"files": open("x.png", "rb")}).json()
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..version import __version__
from ..errors import ClipadError, ImageReadError, InvalidValueError
from ..methods.base import DEFAULT_CLASS
from . import references as refstore
from .batcher import Batcher, QueueFull, predict_groups
from .budget import (
    DEFAULT_INFLIGHT_WAIT_S,
    DEFAULT_MAX_INFLIGHT_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    PixelBudget,
    RequestTooLarge,
    ServerBusy,
    check_request,
    release_memory,
)
from .images import DEFAULT_MAX_PIXELS, ImageTooLarge, declared_size, load_image_bytes, map_png, overlay_png

__all__ = ["background_server", "create_app"]

_MULTIPART_ROUTES = ("/v1/predict", "/v1/references/")

#: After a request of at least this many pixels, freed heap is handed back to the system
#: (:func:`~clipad.serve.budget.release_memory`): below it the few ms of malloc_trim buy little.
_TRIM_AFTER_PIXELS = 4_000_000


# --------------------------------------------------------------------------------------------
# ASGI middleware: token and upload size, both decided before the body is read
# --------------------------------------------------------------------------------------------


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"), *headers],
    })
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """Token check, request content type check, and the upload limit, in front of the app.

    The limit is enforced on the bytes as they arrive: a declared ``Content-Length`` over the
    limit is refused before reading anything, and a body without one (chunked) is counted and
    cut off at the limit; the request is answered 413 and nothing more of it is kept.
    """

    def __init__(self, app, *, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"basic":
            # Browsers can only send a token on a page load as HTTP Basic: any user, token as password.
            import base64
            import binascii

            try:
                value = base64.b64decode(value, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(value, self.token or b"")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        path = scope["path"]
        if self.token is not None and path != "/v1/health" and not self._authorised(headers):
            challenge = b'Basic realm="clipad"' if path == "/" else b'Bearer realm="clipad"'
            await _send_json(send, 401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                             [(b"www-authenticate", challenge)])
            return
        if scope["method"] == "POST" and path.startswith(_MULTIPART_ROUTES):
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            if not ctype.lower().startswith("multipart/form-data") or "boundary=" not in ctype.lower():
                await _send_json(send, 422, f"expected a multipart/form-data body (field 'files'); got content type '{ctype or 'none'}'")
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, f"invalid Content-Length header {length.decode('latin-1')!r}")
                return
            if declared > self.max_body:
                await _send_json(send, 413, self._too_large(declared))
                return

        received = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return  # whatever the app made of the cut-off body, the answer is 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await _send_json(send, 413, self._too_large(None))

    def _too_large(self, declared: int | None) -> str:
        mb = self.max_body / 2**20
        size = f" ({declared / 2**20:.1f} MiB)" if declared is not None else ""
        return f"request body{size} is over this server's upload limit of {mb:g} MiB (--max-upload-mb)"


class _BodyTooLarge(Exception):
    pass


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _page() -> str:
    return resources.files("clipad.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    detector,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = 20.0,
    token: str | None = None,
    threshold: float | None = None,
    references_dir: str | Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    max_queue: int = 1024,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    max_inflight_pixels: int = DEFAULT_MAX_INFLIGHT_PIXELS,
    inflight_wait_s: float = DEFAULT_INFLIGHT_WAIT_S,
) -> FastAPI:
    """Build the ASGI app serving ``detector``.

    Args:
        detector: a :class:`clipad.Detector` (``create_detector`` / ``load_detector``).
        max_batch: most images per model call.
        max_wait_ms: longest wait of a batch's first image for others to join.
        max_upload_mb: largest request body in MiB (413 beyond).
        token: when set, every endpoint but ``/v1/health`` needs ``Authorization: Bearer <token>``.
        threshold: answers carry ``decision``: ``"anomalous"`` if score >= threshold. None (default):
            the detector's calibrated threshold for the request's class (``clipad calibrate``),
            if it has one; else no decision.
        references_dir: where references set over HTTP are kept and reloaded from at start.
        max_image_pixels: largest ``width * height`` of an upload (413 beyond).
        max_queue: most images waiting for the model (503 beyond).
        max_request_pixels: most decoded pixels (sum of ``width * height`` as the headers
            declare them) of one request's images (413 beyond); see :mod:`.budget`.
        max_inflight_pixels: most decoded pixels of all requests being handled at once; a
            request that does not fit waits up to ``inflight_wait_s`` seconds, then gets 503.
        inflight_wait_s: that wait.

    Returns:
        A FastAPI app; run it with uvicorn (``clipad serve``) or a TestClient (within ``with``,
        so that its lifespan starts the batcher).
    """
    for flag, value in (("--max-image-pixels", max_image_pixels), ("--max-request-pixels", max_request_pixels),
                        ("--max-inflight-pixels", max_inflight_pixels)):
        if value <= 0:
            raise InvalidValueError(f"{flag} must be positive; got {value / 1e6:g} MP")
    if max_request_pixels > max_inflight_pixels:
        raise InvalidValueError(
            f"--max-request-pixels ({max_request_pixels / 1e6:g} MP) is over --max-inflight-pixels "
            f"({max_inflight_pixels / 1e6:g} MP): a request that large could never be served; raise the second "
            "or lower the first"
        )
    refs_root = Path(references_dir) if references_dir is not None else None
    budget = PixelBudget(max_inflight_pixels, inflight_wait_s)
    batcher = Batcher(
        lambda items: predict_groups(detector, max_batch, items),
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        # One call up front: the first request should not pay for lazy set-up (text embeddings
        # of the default class, kernel selection).
        from PIL import Image

        await batcher.run_exclusive(detector.predict, [Image.new("RGB", detector.model_size[::-1], (128, 128, 128))])
        if refs_root is not None and detector.few_shot:
            stored = await run_in_threadpool(refstore.load_all, refs_root)
            for name, images in stored.items():
                await batcher.run_exclusive(detector.set_reference, images, class_name=name)
                app.state.shots[name] = len(images)
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="clipad", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the bundled doc pages load scripts from a CDN
    app.state.batcher = batcher
    app.state.budget = budget
    app.state.detector = detector
    app.state.shots = {}
    app.add_middleware(_Guard, token=token, max_body=int(max_upload_mb * 2**20))

    @app.exception_handler(ImageReadError)
    async def _bad_image(request: Request, exc: ImageReadError):
        status = 413 if isinstance(exc, ImageTooLarge) else 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull):
        return JSONResponse({"detail": f"server busy: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestTooLarge)
    async def _request_too_large(request: Request, exc: RequestTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(ServerBusy)
    async def _budget_full(request: Request, exc: ServerBusy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    async def read_uploads(files: list[UploadFile]) -> tuple[list[str], list[bytes], int]:
        """Names, bytes and the request's declared pixels, checked against the per-image and
        per-request limits from the headers alone: nothing is decoded before :func:`admitted`."""
        names = [upload.filename or f"image{i}" for i, upload in enumerate(files)]
        blobs = [await upload.read() for upload in files]

        def sizes() -> list[tuple[str, int, int]]:
            return [(name, *declared_size(data, name, max_image_pixels)) for name, data in zip(names, blobs)]

        pixels = check_request(await run_in_threadpool(sizes), max_request_pixels)
        return names, blobs, pixels

    @contextlib.asynccontextmanager
    async def admitted(pixels: int):
        """Hold ``pixels`` of the in-flight budget for the block; afterwards, when the request was
        large, hand the memory it freed back to the system. The block must not leave decoded
        images referenced behind it (keep them inside a coroutine that returns only answers)."""
        async with budget.hold(pixels):
            yield
        if pixels >= _TRIM_AFTER_PIXELS:
            await run_in_threadpool(release_memory)

    async def decode(names: list[str], blobs: list[bytes]) -> list[Any]:
        images = []
        for i, name in enumerate(names):
            images.append(await run_in_threadpool(load_image_bytes, blobs[i], name, max_image_pixels))
            blobs[i] = b""  # the upload's bytes are not needed once decoded
        return images

    def decision_threshold(cls: str | None) -> float | None:
        """``threshold`` when given, else the detector's calibrated one for ``cls`` (its scores' units)."""
        if threshold is not None:
            return threshold
        th = detector.thresholds_for(cls)
        return None if th is None else th.output_threshold("image")

    def class_or_422(name: str | None) -> str | None:
        if name is None or not name.strip():
            return None
        try:
            return refstore.check_class_name(name)
        except ClipadError as exc:
            raise HTTPException(422, str(exc)) from exc

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page(), headers={
            # Everything the page needs is inline; it may talk only to this server.
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff",
        })

    @app.get("/v1/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict:
        bb = detector.backbone
        return {
            "method": detector.name,
            "backbone": bb.name,
            "pretrained": None if bb.pretrained is None else str(bb.pretrained),
            "device": str(detector.device),
            "version": __version__,
            "image_size": detector.image_size,
            "few_shot": bool(detector.few_shot),
            "default_class": DEFAULT_CLASS,
            "threshold": decision_threshold(None),  # the default class's; calibrated ones by class below
            "calibrated_classes": sorted(detector.thresholds),
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "max_upload_mb": max_upload_mb,
            "max_image_pixels": max_image_pixels,
            "max_request_pixels": max_request_pixels,
            "max_inflight_pixels": max_inflight_pixels,
            "pixel_budget": budget.stats(),
            "token_required": token is not None,
            "references": dict(app.state.shots),
            "batching": batcher.stats(),
        }

    @app.post("/v1/predict")
    async def predict(
        files: list[UploadFile] = File(..., description="images to score (repeat the field for several)"),
        class_name: str | None = Form(None, description=f"product name for prompts and references (default '{DEFAULT_CLASS}')"),
        maps: Literal["overlay", "raw", "both", "none"] = Form("overlay", description="which map PNGs to return"),
    ) -> dict:
        cls = class_or_422(class_name)
        start = time.perf_counter()
        names, blobs, pixels = await read_uploads(files)

        async def score() -> list[dict]:
            # Decoded images and maps live only in this frame: gone when it returns, before
            # the budget is released and memory is trimmed.
            images = await decode(names, blobs)
            try:
                results = await batcher.submit(images, cls)
            except QueueFull:
                raise
            except ClipadError as exc:
                raise HTTPException(400, str(exc)) from exc
            return await run_in_threadpool(_encode_results, names, images, results, maps, decision_threshold(cls))

        async with admitted(pixels):
            out = await score()
        return {"class_name": cls or DEFAULT_CLASS, "results": out,
                "elapsed_ms": round((time.perf_counter() - start) * 1000.0, 3)}

    @app.get("/v1/references")
    async def list_references() -> dict:
        return {"few_shot": bool(detector.few_shot), "classes": dict(app.state.shots)}

    @app.post("/v1/references/{class_name}")
    async def set_references(
        class_name: str,
        files: list[UploadFile] = File(..., description="known-good images of the class (k shots)"),
    ) -> dict:
        cls = class_or_422(class_name)
        if cls is None:
            raise HTTPException(422, "class name is empty")
        if not detector.few_shot:
            raise HTTPException(409, f"method '{detector.name}' has no few-shot mode; it takes no reference images")
        names, blobs, pixels = await read_uploads(files)

        async def set_them() -> bool:
            images = await decode(names, blobs)
            try:
                await batcher.run_exclusive(detector.set_reference, images, class_name=cls)
            except ClipadError as exc:
                raise HTTPException(400, str(exc)) from exc
            if refs_root is None:
                return False
            await run_in_threadpool(refstore.save, refs_root, cls, images)
            return True

        async with admitted(pixels):
            persisted = await set_them()
        app.state.shots[cls] = len(names)
        return {"class_name": cls, "shots": len(names), "persisted": persisted}

    @app.delete("/v1/references/{class_name}")
    async def delete_references(class_name: str) -> dict:
        cls = class_or_422(class_name)
        if cls is None or cls not in app.state.shots:
            raise HTTPException(404, f"no references are set for class {class_name!r}")
        await batcher.run_exclusive(detector.clear_reference, cls)
        if refs_root is not None:
            await run_in_threadpool(refstore.delete, refs_root, cls)
        del app.state.shots[cls]
        return {"class_name": cls, "deleted": True}

    return app


def _encode_results(names, images, results, maps: str, threshold: float | None) -> list[dict]:
    out = []
    for name, image, (score, amap) in zip(names, images, results):
        item: dict[str, Any] = {"name": name, "width": image.width, "height": image.height, "score": score}
        if threshold is not None:
            item["decision"] = "anomalous" if score >= threshold else "normal"
        if maps in ("overlay", "both"):
            item["overlay_png"] = overlay_png(image, amap)
        if maps in ("raw", "both"):
            item["map_png"], item["map_min"], item["map_max"] = map_png(amap)
        out.append(item)
    return out


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (``port=0``: a free port, read it back from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` on uvicorn in a daemon thread; yields its base URL, stops it on exit."""
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="clipad-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ClipadError("the server did not start within 30 s (see the log above for why)")
            time.sleep(0.02)
        bound_host, bound_port = sock.getsockname()[:2]
        yield f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()


def token_from_env(value: str | None) -> str | None:
    """``--token`` if given, else ``$CLIPAD_TOKEN``, else None (an empty value counts as unset)."""
    return value or os.environ.get("CLIPAD_TOKEN") or None
