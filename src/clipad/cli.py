"""``clipad`` command line: predict, eval (and more as methods land).

Every subcommand reports each bad input on one stderr line, carries on with the rest, and exits
1 at the end with a count when anything failed (2 for usage errors such as unknown names).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"clipad: {msg}", file=sys.stderr, flush=True)


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
    from .data import create_dataset
    from .errors import ClipadError

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

    from .errors import ClipadError

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
    import clipad

    precision = getattr(args, "precision", None)
    if args.detector:
        det = clipad.load_detector(args.detector, device=args.device)
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
            det = clipad.create_detector(args.method, backbone=args.backbone, device=args.device, seed=args.init_seed, **kwargs)
        if det.backbone.pretrained is None:
            _err(f"note: backbone '{det.backbone.name}' has random weights (seed {args.init_seed}); scores are for testing only")
    if getattr(args, "compile", False):
        det.compile()
    return det


def _unique_name(stem: str, used: set[str]) -> str:
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


def _load_batch(paths: list[Path]):
    from .errors import ImageReadError
    from .imageio import load_image

    ok, images, errors = [], [], []
    for p in paths:
        try:
            images.append(load_image(p))
            ok.append(p)
        except ImageReadError as exc:
            errors.append(exc)
    return ok, images, errors


def _prefetched_batches(paths: list[Path], batch_size: int):
    """(paths, PIL images, read errors) per batch; the next batch is decoded in a background
    thread while the caller scores the current one (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()
            pending = pool.submit(_load_batch, chunks[i + 1]) if i + 1 < len(chunks) else None
            yield batch


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    from tqdm import tqdm

    from .errors import ClipadError, ImageReadError
    from .imageio import list_images, load_image
    from .viz import save_overlay_png

    failures = 0
    paths: list[Path] = []
    for item in args.images:
        try:
            found = list_images(item)
        except ClipadError as exc:
            _err(str(exc))
            failures += 1
            continue
        if not found:
            _err(f"'{item}' holds no images ({', '.join(sorted(e.lstrip('.') for e in _exts()))}); skipped")
            failures += 1
        paths.extend(found)
    if not paths:
        _err("no images to process")
        return EXIT_FAILED_INPUTS

    det = build_detector(args)
    if args.reference:
        refs, ref_paths = [], []
        for item in args.reference:
            for p in list_images(item):
                try:
                    refs.append(load_image(p))
                    ref_paths.append(p)
                except ImageReadError as exc:
                    _err(f"reference {exc}; skipped")
                    failures += 1
        if not refs:
            _err("none of the --reference images could be read")
            return EXIT_FAILED_INPUTS
        det.set_reference(refs, class_name=None)

    out = Path(args.out)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    if args.save_maps:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows: list[tuple[str, float]] = []
    bar = tqdm(total=len(paths), desc=f"{det.name}", unit="img", file=sys.stderr, disable=args.quiet)
    for batch_paths, images, errors in _prefetched_batches(paths, args.batch_size):
        for exc in errors:
            bar.clear()
            _err(f"{exc}; skipped")
            failures += 1
        if images:
            pred = det.predict(images, class_name=args.class_name, batch_size=args.batch_size)
            for i, (p, img) in enumerate(zip(batch_paths, images)):
                amap = pred.anomaly_maps[i].numpy()
                score = float(pred.image_scores[i])
                name = _unique_name(p.stem, used)
                save_overlay_png(out / "heatmaps" / f"{name}.png", img, amap, score=score, title=p.name,
                                 vmin=args.vmin, vmax=args.vmax)
                if args.save_maps:
                    np.save(out / "maps" / f"{name}.npy", amap.astype(np.float32))
                rows.append((str(p), score))
        bar.update(len(batch_paths) + len(errors))
    bar.close()

    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score"])
        w.writerows((p, f"{s:.6f}") for p, s in rows)
    print(f"{len(rows)} image(s) scored -> {out / 'scores.csv'}, heatmaps in {out / 'heatmaps'}")
    if failures:
        _err(f"{failures} input(s) failed; see the lines above")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def _exts():
    from .imageio import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def cmd_methods(args: argparse.Namespace) -> int:
    import clipad

    for m in clipad.list_methods():
        print(m)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipad",
        description="Zero- and few-shot visual anomaly detection with a frozen CLIP: image scores and anomaly maps.",
    )
    parser.add_argument("--version", action="version", version=f"clipad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("predict", help="score images and write heatmaps",
                       description="Score images (files or directories) and write scores.csv plus a heatmap overlay per image.")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or directories (searched recursively)")
    add_model_args(p)
    p.add_argument("--reference", nargs="+", metavar="GOOD", default=None,
                   help="known-good reference images or directories (k-shot; methods with few-shot support)")
    p.add_argument("--class-name", default=None, help="product name used in text prompts (default: 'object')")
    p.add_argument("--out", default="clipad_out", help="output directory (default: clipad_out)")
    p.add_argument("--save-maps", action="store_true", help="also save each raw anomaly map as maps/<name>.npy (float32, image size)")
    p.add_argument("--vmin", type=float, default=None, help="colour scale minimum of heatmaps (default: per image)")
    p.add_argument("--vmax", type=float, default=None, help="colour scale maximum of heatmaps (default: per image)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(func=cmd_methods)

    from .bench import add_bench_parser
    from .convert import add_convert_parser
    from .evaluate import add_eval_parser
    from .serve import add_serve_parser
    from .train import add_train_parser

    add_eval_parser(sub, add_model_args)
    add_train_parser(sub, add_model_args)
    add_convert_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub, add_model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import ClipadError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ClipadError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
