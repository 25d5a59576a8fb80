"""``clipad calibrate``: pass/fail thresholds for a detector, saved in its file (argparse side of
:mod:`clipad.deploy.calibrate`).

Normal images (files, directories): thresholds at a target false-positive rate (``--fpr``,
``--pixel-fpr``). A labelled dataset (``--dataset``, the layouts of ``clipad eval``): F1-max
thresholds per class. The detector, with its references and thresholds, is written to ``--out``;
``clipad predict`` / ``clipad serve`` with ``--detector OUT`` then decide pass/fail.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from ..deploy.calibrate import CONFIDENCE, DEFAULT_FPR, DEFAULT_PIXEL_FPR
from .common import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    add_dataset_args,
    add_max_image_pixels_arg,
    add_model_args,
    build_detector,
    dataset_from_args,
    existing_path,
    max_image_pixels,
    non_empty,
    output_file,
    report,
)


def rate(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a rate or a confidence)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), e.g. 0.01 for 1%; got {text!r}")
    return value


#: Defaults of the options that only normal-image calibration takes (None = not given, so that
#: giving one with --dataset is an error).
_NORMAL_ONLY = {"fpr": ("--fpr", DEFAULT_FPR), "pixel_fpr": ("--pixel-fpr", DEFAULT_PIXEL_FPR),
                "confidence": ("--confidence", CONFIDENCE)}


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate pass/fail thresholds from normal or labelled images",
        description="Calibrate a detector's pass/fail thresholds and write it, thresholds included, to --out. "
        "From normal images (IMAGES_OR_DIRS, none of them a --reference image): the image threshold at a target "
        "false-positive rate on new normal images (--fpr; conformal, with a 95% upper bound of the achieved rate) "
        "and the pixel threshold at a target pixel false-positive rate (--pixel-fpr); --class-name names their "
        "class (prompts, and the class the thresholds serve; default: every class without its own). From a "
        "labelled dataset (--dataset ..., as clipad eval): the F1-max thresholds of each class. "
        "clipad predict and clipad serve with --detector OUT then report labels and masks.",
    )
    p.add_argument("images", nargs="*", metavar="IMAGES_OR_DIRS",
                   help="normal (defect-free) images and/or directories (searched recursively)")
    add_model_args(p)
    add_dataset_args(p, optional=True)
    g = p.add_argument_group("calibration")
    g.add_argument("--reference", nargs="+", action="extend", type=existing_path, metavar="GOOD", default=None,
                   help="known-good reference images or directories (k-shot methods), kept in the written detector; "
                   "give them after the images, or end the list with --")
    g.add_argument("--fpr", type=rate, default=None,
                   help="normal images: target false-positive rate of images on new normal images (default: 0.01); "
                   "needs at least ceil(1/fpr)-1 images (99 for 0.01; 313 keep the 95%% bound within 2x)")
    g.add_argument("--pixel-fpr", type=rate, default=None,
                   help="normal images: target false-positive rate of pixels (default: 0.001, 0.1%% of a normal "
                   "image's area flagged on average)")
    g.add_argument("--confidence", type=rate, default=None,
                   help="normal images: confidence of the reported upper bound of the FPR (default: 0.95)")
    g.add_argument("--classes", nargs="+", action="extend", type=non_empty, default=None,
                   help="--dataset: calibrate only these classes (default: all)")
    g.add_argument("--normalize", action="store_true",
                   help="also min-max normalise scores and maps to [0, 1] with the thresholds at 0.5 (anomalib's "
                   "convention: clip((x - threshold) / (max - min) + 0.5, 0, 1), min and max of the calibration data)")
    g.add_argument("--out", dest="output", required=True, type=output_file, metavar="OUT.safetensors",
                   help="the calibrated detector to write (may be the --detector file itself)")
    add_max_image_pixels_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)
    p.checks.append(_check_inputs)


def _check_inputs(ns: argparse.Namespace) -> str | None:
    """Normal images or --dataset (one of them), each with its own options; fills in defaults."""
    if ns.images and ns.dataset:
        return "argument IMAGES_OR_DIRS: not with --dataset; give normal images or a labelled dataset"
    if not ns.images and not ns.dataset:
        return "argument IMAGES_OR_DIRS: give normal images (or directories), or a labelled dataset with --dataset"
    for dest, (flag, default) in _NORMAL_ONLY.items():
        if getattr(ns, dest) is None:
            setattr(ns, dest, default)
        elif ns.dataset:
            return f"argument {flag}: only for normal images; with --dataset the thresholds are F1-max"
    if ns.classes and not ns.dataset:
        return "argument --classes: only with --dataset"
    return None


def _normal_images(args: argparse.Namespace, det, reference_paths: list[Path]):
    """-> (thresholds, failures) of the normal images named on the command line."""
    from tqdm import tqdm

    from ..deploy.calibrate import NormalCalibrator, pixel_count
    from ..errors import InvalidValueError
    from .predict import _prefetched_batches, collect_inputs

    paths, failures = collect_inputs(args.images)
    seen = {p.resolve() for p in reference_paths}
    both = [p for p in paths if p.resolve() in seen]
    if both:  # scored against themselves, they would set the threshold too low
        raise InvalidValueError(f"{len(both)} calibration image(s) are also --reference images (e.g. '{both[0]}'): "
                                "the FPR guarantee needs normal images the detector has not seen; use others")
    cal = NormalCalibrator(args.fpr, args.pixel_fpr, max_pixels=sum(map(pixel_count, paths)), confidence=args.confidence)
    with tqdm(total=len(paths), desc=f"{det.name} calibrate", unit="img", file=sys.stderr, disable=args.quiet) as bar:
        for batch_paths, images, errors in _prefetched_batches(paths, args.batch_size, max_image_pixels(args)):
            for exc in errors:
                report(f"{exc}; skipped")
                failures += 1
            if images:
                cal.add(det.predict(images, class_name=args.class_name, batch_size=args.batch_size, calibrated=False))
            bar.update(len(batch_paths) + len(errors))
    return cal.finish(det, args.class_name or "", args.normalize), failures


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..deploy.calibrate import Calibration, calibrate
    from ..errors import SkippedInputWarning
    from ..eval.files import display_path
    from .predict import read_references

    det = build_detector(args)
    refs, ref_paths, failures = read_references(args)
    if args.reference:
        if not refs:
            report("none of the --reference images could be read")
            return EXIT_FAILED_INPUTS
        det.set_reference(refs, class_name=args.class_name if not args.dataset else None)
    if args.dataset:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = calibrate(det, dataset=dataset_from_args(args), classes=args.classes, normalize=args.normalize,
                                batch_size=args.batch_size, max_pixels=max_image_pixels(args))
        for w in caught:  # shown now, as clipad: lines (main's handler); skipped files count as failures
            failures += issubclass(w.category, SkippedInputWarning)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    else:
        thresholds, failed = _normal_images(args, det, ref_paths)
        failures += failed
        det.set_thresholds(thresholds, args.class_name)
        results = [Calibration(args.class_name or "", thresholds)]
    out = det.save(args.output)
    for r in results:
        print(r.summary())
    print(f"-> {display_path(out)}")
    if failures:
        report(f"{failures} input(s) failed; see the lines above")
        return EXIT_FAILED_INPUTS
    return EXIT_OK
