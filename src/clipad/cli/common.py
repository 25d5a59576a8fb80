"""What the subcommands share: model and dataset options, building the detector, and the one way
errors and notes reach the terminal (:func:`report`).

Exit codes: 0 ok, 1 some inputs failed (each reported on its own line), 2 usage errors (a bad
option value, an unknown name), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2


def report(msg: str) -> None:
    """Print ``clipad: msg`` on stderr, above any progress bar (tqdm-aware), flushed."""
    from tqdm import tqdm

    tqdm.write(f"clipad: {msg}", file=sys.stderr)
    sys.stderr.flush()


def _pretrained_arg(value: str | None):
    if value is None:
        return None
    return None if value.lower() in ("none", "random") else value


def add_model_args(p: argparse.ArgumentParser, multi_method: bool = False) -> None:
    g = p.add_argument_group("model")
    if multi_method:
        g.add_argument("--method", nargs="+", default=["winclip"],
                       help="one or more detection methods (see `clipad methods`; default: winclip)")
    else:
        g.add_argument("--method", default="winclip", help="detection method (see `clipad methods`; default: winclip)")
    g.add_argument(
        "--backbone", default=None,
        help="'tiny' or an open_clip architecture, e.g. ViT-B-16-plus-240 (default: the method's paper backbone)",
    )
    g.add_argument(
        "--pretrained", default=None,
        help="open_clip tag (e.g. laion400m_e31), a checkpoint file, or 'none' for random weights "
        "(default: the method's tag for its default backbone; 'none' for tiny)",
    )
    g.add_argument("--detector", default=None, metavar="FILE",
                   help="a detector saved with det.save() (.safetensors); replaces --method/--backbone/--pretrained")
    g.add_argument("--image-size", type=int, default=None, help="model input size in pixels (default: the method's)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="auto (default: bf16 autocast of the image tower on CUDA, fp32 elsewhere), fp32, or bf16 "
                   "(also on CPUs with bf16 support); method heads always run in fp32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the scoring path (first batch of each shape compiles; optional speed-up)")
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="learned weights of a trained method (.safetensors from `clipad train` or `clipad convert`)")
    g.add_argument("--tta", action="store_true", help="anoclip: test-time adaptation of its adapter (AnoCLIP+)")
    g.add_argument("--domain", default=None, help="anoclip: prompt domain (object, texture, medical; default: from the class name)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, e.g. --set scales=[2,3] --set temperature=0.05 (values parsed as JSON when possible)")
    g.add_argument("--init-seed", type=int, default=0, help="seed of random weights when --pretrained none (default: 0)")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """--dataset/--root and each layout's own options (shared by eval and train)."""
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", required=True, choices=["mvtec", "visa", "meta", "folder"], help="dataset layout")
    g.add_argument("--root", required=True, help="dataset root directory")
    g.add_argument("--normal-dir", action="append", default=[], help="folder layout: a normal-image directory under --root (repeatable)")
    g.add_argument("--abnormal-dir", action="append", default=[], help="folder layout: an anomalous-image directory under --root (repeatable)")
    g.add_argument("--mask-dir", action="append", default=[], help="folder layout: mask directory, masks matched by file stem (repeatable)")
    g.add_argument("--class-name", default=None, help="folder layout: class name (default: the root folder's name)")
    g.add_argument("--meta-path", default=None, help="meta layout: path of meta.json (default: ROOT/meta.json)")
    g.add_argument("--split-csv", default=None, help="visa layout: split file (default: ROOT/split_csv/1cls.csv)")


def dataset_from_args(args: argparse.Namespace):
    """The :class:`~clipad.data.AnomalyDataset` that :func:`add_dataset_args` options name."""
    from ..data import create_dataset
    from ..errors import ClipadError

    opts: dict = {}
    if args.dataset == "folder":
        if not args.normal_dir and not args.abnormal_dir:
            raise ClipadError("--dataset folder needs --normal-dir and/or --abnormal-dir (relative to --root)")
        opts = {"normal_dirs": args.normal_dir, "abnormal_dirs": args.abnormal_dir,
                "mask_dirs": args.mask_dir, "class_name": args.class_name}
    elif args.dataset == "meta" and args.meta_path:
        opts["meta_path"] = args.meta_path
    elif args.dataset == "visa" and args.split_csv:
        opts["split_csv"] = args.split_csv
    return create_dataset(args.dataset, args.root, **opts)


def method_options(args: argparse.Namespace) -> dict:
    """Method options from --tta, --domain and --set KEY=VALUE."""
    import json

    from ..errors import ClipadError

    opts: dict = {}
    if getattr(args, "checkpoint", None):
        opts["checkpoint"] = args.checkpoint
    if getattr(args, "tta", False):
        opts["tta"] = True
    if getattr(args, "domain", None):
        opts["domain"] = args.domain
    for item in getattr(args, "set", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClipadError(f"--set expects KEY=VALUE; got '{item}'")
        try:
            opts[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.strip().replace("-", "_")] = value
    return opts


def build_detector(args: argparse.Namespace):
    from .. import api

    precision = getattr(args, "precision", None)
    if args.detector:
        det = api.load_detector(args.detector, device=args.device)
        if precision:
            det.precision = precision
    else:
        kwargs = method_options(args)
        if args.image_size:
            kwargs["image_size"] = args.image_size
        if precision:
            kwargs["precision"] = precision
        if args.pretrained is not None:
            kwargs["pretrained"] = _pretrained_arg(args.pretrained)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            det = api.create_detector(args.method, backbone=args.backbone, device=args.device, seed=args.init_seed, **kwargs)
        if det.backbone.pretrained is None:
            report(f"note: backbone '{det.backbone.name}' has random weights (seed {args.init_seed}); scores are for testing only")
    if getattr(args, "compile", False):
        det.compile()
    return det
