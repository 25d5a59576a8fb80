"""``clipad convert``: import an official checkpoint into clipad's format (see :mod:`clipad.convert`)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import backbone_name, existing_file, output_file, pretrained_source, pretrained_value


def add_convert_parser(sub) -> None:
    from ..methods.registry import list_converters

    sources = list_converters()
    p = sub.add_parser(
        "convert", help=f"import an official checkpoint ({', '.join(sources)}) into clipad's format",
        description="Read an official checkpoint (.pth, tensors only) and write a clipad .safetensors usable with "
        "clipad.load_detector / --detector, or as create_detector(METHOD, checkpoint=OUT).",
    )
    p.add_argument("--from", dest="source", required=True, choices=sources,
                   help="which official code wrote the file (the method of that name)")
    p.add_argument("input", metavar="OFFICIAL.pth", type=existing_file, help="the official checkpoint")
    p.add_argument("output", metavar="OUT.safetensors", type=output_file, help="the clipad checkpoint to write")
    p.add_argument("--backbone", type=backbone_name, default=None, help="backbone recorded in the header (default: the paper's)")
    p.add_argument("--pretrained", type=pretrained_source, default=None,
                   help="weights recorded in the header: an open_clip tag or a file (default: the paper's, e.g. openai)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {"backbone": args.backbone}
    if args.pretrained is not None:
        kwargs["pretrained"] = pretrained_value(args.pretrained)
    from ..convert import convert_checkpoint

    out = convert_checkpoint(args.source, args.input, args.output, **kwargs)
    print(f"{args.input} -> {out} (clipad.load_detector('{out}') or checkpoint='{out}')")
    return 0
