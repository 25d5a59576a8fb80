"""``clipad serve``: the command-line entry of the HTTP service."""

from __future__ import annotations

import argparse

from ..errors import ClipadError
from .common import (
    add_model_args,
    build_detector,
    finite_float,
    non_empty,
    non_negative_float,
    output_dir,
    port,
    positive_float,
    positive_int,
    report,
)


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP inspection service with a web page",
        description="Serve a detector over HTTP: POST /v1/predict, POST /v1/references/{class_name}, "
        "GET /v1/health, GET /v1/info, and an inspection page at /. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    add_model_args(p)
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", type=non_empty, help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=port, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    g.add_argument("--max-batch", type=positive_int, default=16, help="most images per model call (default: 16)")
    g.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                   help="longest wait of a batch's first image for others to join (default: 5)")
    g.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest request body in MiB (default: 20)")
    g.add_argument("--token", default=None, type=non_empty,
                   help="bearer token required on every endpoint but /v1/health (default: $CLIPAD_TOKEN; "
                   "prefer the variable: command lines are visible to other users)")
    g.add_argument("--threshold", type=finite_float, default=None,
                   help="score at or above which an image is reported 'anomalous', for every class (default: the "
                   "--detector file's calibrated threshold of the request's class, see clipad calibrate; else no decision)")
    g.add_argument("--references-dir", type=output_dir, default=None, metavar="DIR",
                   help="keep references set over HTTP in DIR and reload them at start (default: memory only)")
    b = p.add_argument_group("resource budgets (decoded pixels, from the image headers, before decoding; "
                             "see docs/serve.md)")
    b.add_argument("--max-image-pixels", type=positive_float, default=50.0, metavar="MP",
                   help="largest width*height of one image, in megapixels (default: 50); also Pillow's "
                   "decompression-bomb limit in this process")
    b.add_argument("--max-request-pixels", type=positive_float, default=64.0, metavar="MP",
                   help="most pixels of all images of one request, in megapixels (default: 64; 413 beyond)")
    b.add_argument("--max-inflight-pixels", type=positive_float, default=256.0, metavar="MP",
                   help="most pixels of all requests being handled at once, in megapixels (default: 256; "
                   "a request that does not fit waits up to 2 s, then gets 503)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    p.checks.append(_check_budgets)


def _check_budgets(ns: argparse.Namespace) -> str | None:
    if ns.max_request_pixels > ns.max_inflight_pixels:
        return (f"argument --max-request-pixels: {ns.max_request_pixels:g} is over --max-inflight-pixels "
                f"({ns.max_inflight_pixels:g}): such a request could never be served; raise the second")
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import bind_socket, create_app, token_from_env
    except ImportError as exc:
        raise ClipadError(f"clipad serve needs the 'serve' extra ({exc.name} is missing): pip install 'clipad[serve]'") from exc
    # the values were checked while parsing (positive, finite; request <= in flight)
    budgets = {flag: int(getattr(args, flag) * 1_000_000)
               for flag in ("max_image_pixels", "max_request_pixels", "max_inflight_pixels")}
    token = token_from_env(args.token)
    # This process is the server: Pillow's decompression-bomb check (it refuses images over twice
    # its limit while opening them) follows our per-image limit instead of its own 89 MP default.
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = budgets["max_image_pixels"]
    det = build_detector(args)
    app = create_app(det, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                     token=token, threshold=args.threshold, references_dir=args.references_dir, **budgets)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise ClipadError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    host, port = sock.getsockname()[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        report(f"warning: listening on {args.host} without a token: anyone who can reach this port can use the model")
    # Tests and scripts wait for this line (it carries the port chosen for --port 0).
    report(f"serving {det.name} on {det.backbone.name} ({det.device}) at http://{host if ':' not in host else f'[{host}]'}:{port}/")
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, lifespan="on"))
    server.run(sockets=[sock])
    return 0

