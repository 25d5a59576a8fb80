"""``clipad bench``: milliseconds per image of methods and of the bare backbone (random weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import (
    backbone_name,
    check_method_options,
    device,
    key_value,
    method_name,
    method_options,
    non_negative_int,
    option_items,
    output_file,
    positive_int,
)


def add_bench_parser(sub) -> None:
    from ..methods import list_methods

    p = sub.add_parser("bench", help="measure throughput of methods and the bare backbone",
                       description="Measure milliseconds per image of methods and of the bare backbone. Random weights; nothing is downloaded.")
    p.add_argument("--method", default="all", type=method_name(list_methods(), extra=("all",)),
                   help="a method name or 'all' (default)")
    p.add_argument("--backbone", type=backbone_name, default=None, help="backbone (default: each method's paper backbone)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input size (default: the method's)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--shots", type=non_negative_int, default=0, help="reference images (few-shot methods)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="fp32 or bf16 autocast (default fp32)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls per batch size (default 2)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per batch size; the median is reported (default 5)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the scoring path (compiled during warm-up)")
    p.add_argument("--channels-last", action="store_true", help="channels-last input and patch embedding (CPU tuning)")
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE", help="method option, as for predict")
    p.add_argument("--json", type=output_file, default=None, metavar="OUT", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)
    p.checks.append(_check_bench_options)


def _check_bench_options(ns: argparse.Namespace) -> str | None:
    """Each --set fits every method benchmarked (``all``: every registered one)."""
    from ..methods import list_methods

    return check_method_options(list_methods() if ns.method == "all" else [ns.method], option_items(ns))


def cmd_bench(args: argparse.Namespace) -> int:
    import platform

    import torch

    from ..eval.speed import bench_method, format_rows
    from ..methods import list_methods

    methods = list_methods() if args.method == "all" else [args.method]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for m in methods:
        rows += bench_method(
            m, backbone=args.backbone, image_size=args.image_size, batches=args.batch, shots=args.shots,
            device=args.device, dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
            options=method_options(args), compile=args.compile, channels_last=args.channels_last,
        )
    dev = rows[0]["device"] if rows else "?"
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"# clipad bench on {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; random weights; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": name, "rows": rows}, indent=2))
    return 0
