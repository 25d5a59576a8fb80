"""``clipad train``: train a learned method (argparse side of :mod:`clipad.train`)."""

from __future__ import annotations

import argparse

from ..errors import ClipadError
from ..methods.base import LearnedDetector
from ..methods.registry import learned_methods
from .common import (
    add_dataset_args,
    add_model_args,
    build_detector,
    dataset_from_args,
    non_empty,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    report,
    seed_int,
)

DEFAULT_METHOD = "anomalyclip"


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help=f"train a learned method ({', '.join(learned_methods())}) on an auxiliary dataset",
        description="Train a learned method on an auxiliary labelled dataset (the official protocol uses its test "
        "split with masks: train on MVTec AD to evaluate on VisA, and the reverse). Writes OUT/<method>.safetensors "
        "(load with clipad.load_detector or --detector), per-epoch resumable checkpoints and CSV/JSON logs.",
    )
    add_dataset_args(p)
    add_model_args(p, methods=learned_methods(), default_method=DEFAULT_METHOD, why_not="has nothing to train")
    p.set_defaults(batch_size=None)
    p.add_argument("--out", required=True, type=output_dir, help="output directory (checkpoints, logs, final detector)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the method's, 15 for anomalyclip)")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate (default: the method's, 1e-3)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed of prompt init and sample order (default: the method's, 111)")
    p.add_argument("--split", default="test", choices=["test", "train", "all"],
                   help="which split of the dataset to train on (default: test, the official protocol)")
    p.add_argument("--classes", nargs="+", action="extend", type=non_empty, default=None,
                   help="train only on these classes (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete epoch checkpoint in --out")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--workers", type=non_negative_int, default=2,
                   help="image-decoding worker processes, 0: in this process (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.loop import TrainConfig, fit

    dataset = dataset_from_args(args)
    if args.classes:
        dataset = dataset.filter(class_name=args.classes)
    samples = dataset if args.split == "all" else dataset.filter(split=args.split)
    if not len(samples):
        raise ClipadError(f"the {args.split} split of '{args.root}' holds no images to train on")
    det = build_detector(args)
    if not isinstance(det, LearnedDetector):
        raise ClipadError(f"'{args.detector}' is a '{det.name}' detector, which has nothing to train; methods with "
                          f"learned weights: {', '.join(learned_methods())}")
    config = TrainConfig.for_method(det, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                    max_steps=args.max_steps)
    info = {"dataset": args.dataset, "root": str(args.root), "split": args.split, "images": len(samples),
            "anomalous": sum(s.label for s in samples), "classes": list(samples.classes)}
    # --detector FILE or --set checkpoint=FILE: fine-tune from those weights; else a fresh start
    fresh = False if args.detector else None
    pool = list(dataset.filter(split="train", label=0)) if det.training_references else None
    result = fit(det, list(samples), args.out, config, resume=args.resume, workers=args.workers, quiet=args.quiet,
                 dataset_info=info, fresh=fresh, reference_pool=pool)
    for e in result.epochs:
        print(f"epoch {e['epoch']}: loss {e['loss']:.4f} ({e['steps']} steps)")
    print(f"{result.steps} step(s) -> {result.final_path} (clipad.load_detector / --detector); logs in {args.out}")
    if result.failures:
        report(f"{len(result.failures)} file(s) could not be read and were skipped; see the lines above")
        return 1
    return 0
