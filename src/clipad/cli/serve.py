"""``clipad serve``: the command-line entry of the HTTP service."""

from __future__ import annotations

import argparse
import sys

from ..errors import ClipadError
from .common import add_model_args, build_detector, report


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP inspection service with a web page",
        description="Serve a detector over HTTP: POST /v1/predict, POST /v1/references/{class_name}, "
        "GET /v1/health, GET /v1/info, and an inspection page at /. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    add_model_args(p)
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    g.add_argument("--max-batch", type=int, default=16, help="most images per model call (default: 16)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest wait of a batch's first image for others to join (default: 5)")
    g.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MiB (default: 20)")
    g.add_argument("--token", default=None,
                   help="bearer token required on every endpoint but /v1/health (default: $CLIPAD_TOKEN; "
                   "prefer the variable: command lines are visible to other users)")
    g.add_argument("--threshold", type=float, default=None,
                   help="score at or above which an image is reported 'anomalous' (default: no decision)")
    g.add_argument("--references-dir", default=None, metavar="DIR",
                   help="keep references set over HTTP in DIR and reload them at start (default: memory only)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import bind_socket, create_app, token_from_env
    except ImportError as exc:
        raise ClipadError(f"clipad serve needs the 'serve' extra ({exc.name} is missing): pip install 'clipad[serve]'") from exc
    if args.max_batch < 1:
        raise ClipadError(f"--max-batch must be at least 1; got {args.max_batch}")
    if args.max_upload_mb <= 0:
        raise ClipadError(f"--max-upload-mb must be positive; got {args.max_upload_mb}")
    token = token_from_env(args.token)
    det = build_detector(args)
    app = create_app(det, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                     token=token, threshold=args.threshold, references_dir=args.references_dir)
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

