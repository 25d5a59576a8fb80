"""``clipad eval``: metrics of one or more methods on a dataset (argparse side of :mod:`clipad.eval.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_dataset_args,
    add_max_image_pixels_arg,
    add_model_args,
    add_ray_args,
    build_detector,
    dataset_from_args,
    device,
    max_image_pixels,
    non_empty,
    non_negative_int,
    output_dir,
    positive_int,
    ray_options,
    report,
    seed_int,
)


def add_eval_parser(sub) -> None:
    from ..eval import metrics as metrics_mod

    p = sub.add_parser(
        "eval", help="evaluate methods on MVTec AD, VisA, a meta.json list or folders",
        description="Evaluate one or more methods on a dataset: per-class and mean metrics table, "
        "metrics.json, metrics.csv, ROC/PR curves and a self-contained HTML report.",
    )
    add_dataset_args(p)
    add_model_args(p, multi_method=True)
    p.add_argument("--shots", type=non_negative_int, default=0,
                   help="k normal reference images per class (default 0: zero-shot); drawn with replacement, "
                   "as the official protocol: a class with fewer normal images repeats some (a warning says so)")
    p.add_argument("--seed", type=seed_int, default=10,
                   help="reference sampling seed (default 10; the official AdaptCLIP scripts use 10, 20, 30)")
    p.add_argument("--classes", nargs="+", action="extend", type=non_empty, default=None,
                   help="evaluate only these classes (repeatable)")
    p.add_argument("--out", default="clipad_eval", type=output_dir,
                   help="output directory, created if missing (default: clipad_eval)")
    p.add_argument("--eval-size", type=positive_int, default=None, help="map/mask size for pixel metrics (default: the model input size)")
    p.add_argument("--resize", default="torch", choices=["torch", "pil"],
                   help="how images and masks reach the model/eval size: torch (default: as predict, antialiased bicubic "
                   "on tensors, masks nearest) or pil (as the official AnomalyCLIP/AdaptCLIP test scripts: PIL bicubic "
                   "images, PIL bilinear masks binarised at 0.5: use it to reproduce paper numbers)")
    p.add_argument("--protocol", default="anomalyclip", choices=sorted(metrics_mod.PROTOCOLS),
                   help="metric definitions preset (default: anomalyclip, the official evaluation code)")
    p.add_argument("--workers", type=non_negative_int, default=2,
                   help="image-decoding worker processes, 0: in this process (default: 2)")
    p.add_argument("--metrics-device", type=device, default=None,
                   help="where pixel metrics are computed (default: the detector's device; 'cpu' saves GPU memory)")
    p.add_argument("--examples", type=non_negative_int, default=3, help="highest- and lowest-scoring images per class in the report")
    add_max_image_pixels_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..errors import OutputWriteError
    from ..eval.files import display_path, display_text
    from ..eval.run import format_table, run, table_rows, write_outputs

    if args.ray is not None:
        from ..distributed.runtime import require_ray

        require_ray()  # the one clear line before anything is read or built
    dataset = dataset_from_args(args)
    # with --detector: the saved detector, named by its own method (args.method is None then)
    methods = args.method if isinstance(args.method, list) else [args.method]
    any_failed = False
    for method in methods:
        ns = argparse.Namespace(**{**vars(args), "method": method})
        det = build_detector(ns)
        method = det.name
        out = Path(args.out) if len(methods) == 1 else Path(args.out) / method
        if args.ray is not None:  # the same result, scored by Ray Data actors (shards under out)
            from ..distributed import evaluate

            result = evaluate(
                dataset, out, detector=det, classes=args.classes, shots=args.shots, seed=args.seed,
                eval_size=args.eval_size, batch_size=args.batch_size, protocol=args.protocol, n_examples=args.examples,
                progress=not args.quiet, metrics_device=args.metrics_device, resize=args.resize,
                max_pixels=max_image_pixels(args), **ray_options(args),
            )
        else:
            result = run(
                det, dataset, classes=args.classes, shots=args.shots, seed=args.seed, eval_size=args.eval_size,
                batch_size=args.batch_size, workers=args.workers, protocol=args.protocol, n_examples=args.examples,
                quiet=args.quiet, metrics_device=args.metrics_device, resize=args.resize,
                max_pixels=max_image_pixels(args),
            )
        if not result.classes:
            report(f"{method}: no image could be evaluated")
            any_failed = True
            continue
        config = {
            "method": method, "backbone": det.backbone.name, "pretrained": det.backbone.pretrained,
            "image_size": det.image_size, "eval_size": args.eval_size or det.image_size,
            "dataset": args.dataset, "root": str(args.root), "shots": args.shots, "seed": args.seed,
            "protocol": args.protocol, "resize": args.resize, "device": str(det.device),
        }
        try:
            paths = write_outputs(result, out, config)
        except OutputWriteError as exc:  # each file not written on its line; the others stand
            for problem in exc.problems:
                report(problem)
            paths = exc.written
            any_failed = True
        print(f"\n{method} on {args.dataset} ({args.shots}-shot), {result.seconds:.1f} s")
        print(format_table(table_rows(result)))
        excluded = sorted({display_text(c) for v in result.excluded.values() for c in v})
        if excluded:
            print(f"* n/a: undefined for {', '.join(excluded)}; left out of the mean")
        if paths:
            print("-> " + ", ".join(display_path(p) for p in paths.values()))
        if result.failures:
            report(f"{len(result.failures)} file(s) could not be read; see the lines above")
            any_failed = True
    return 1 if any_failed else 0
