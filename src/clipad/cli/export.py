"""``clipad export``: a detector as an ONNX model for one class, checked against the torch detector.

    clipad export --method winclip --class-name bottle --reference good/ --out bottle.onnx
    clipad export --detector bottle.safetensors --class-name bottle --out bottle.onnx --verify 8

Writes ``OUT`` and its manifest ``OUT.json`` (see :mod:`clipad.deploy.export`); ``--verify N``
(default 2) scores N seeded images (or ``--verify-images DIR``) with both and exits 1 when they
differ by more than ``--tolerance``. ``clipad predict --model OUT IMAGES`` runs the result
without torch.
"""

from __future__ import annotations

import argparse
import sys

from .common import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    add_max_image_pixels_arg,
    add_model_args,
    build_detector,
    existing_dir,
    existing_path,
    max_image_pixels,
    non_empty,
    non_negative_int,
    option_items,
    output_file,
    positive_float,
    report,
)


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a detector to ONNX (checked against the torch detector)",
        description="Export a detector for one class as an ONNX model (text embeddings and references folded in as "
        "constants) plus a manifest OUT.json; --verify compares it with the torch detector. Methods that optimise "
        "per image (anoclip --tta) cannot be exported.",
    )
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", required=True, type=output_file, metavar="MODEL.onnx", help="the model file to write")
    add_model_args(p)
    p.add_argument("--class-name", default=None, type=non_empty,
                   help="the class the model scores: its text prompts and references become constants (default: 'object')")
    p.add_argument("--reference", nargs="+", action="extend", type=existing_path, metavar="GOOD", default=None,
                   help="known-good reference images or directories, folded into the model (k-shot; methods with "
                   "few-shot support); a --detector's saved references for the class are used otherwise")
    p.add_argument("--input", dest="input_format", choices=["uint8", "float"], default="uint8",
                   help="input of the graph: uint8 RGB [B, H, W, 3] (default) or float [B, 3, H, W] in [0, 1]; H x W "
                   "is the model size")
    p.add_argument("--opset", type=int, choices=range(17, 21), default=17, metavar="{17..20}", help="ONNX opset (default: 17)")
    p.add_argument("--verify", type=non_negative_int, default=None, metavar="N",
                   help="compare with the torch detector on N seeded images (default: 2; 0: no check); with "
                   "--verify-images: at most N of its images")
    p.add_argument("--verify-images", type=existing_dir, default=None, metavar="DIR",
                   help="compare on the images in DIR (resized to the model size) instead of seeded ones")
    p.add_argument("--tolerance", type=positive_float, default=None,
                   help="largest |Δ| of scores and maps accepted by --verify (default: 1e-4, fp32)")
    add_max_image_pixels_arg(p)
    p.set_defaults(func=cmd_export)
    p.checks.insert(0, _check_export_options)


def _check_export_options(ns: argparse.Namespace) -> str | None:
    if ns.compile:
        return "argument --compile: not used by export (the graph is traced from the eager path); leave it out"
    for flag, key, value in option_items(ns):
        if key == "tta" and value is True:
            return (f"argument {flag}: anoclip with test-time adaptation trains an adapter on every image; no fixed "
                    "graph computes that: export without it")
    if ns.verify == 0 and ns.verify_images:
        return "argument --verify: 0 skips the check, but --verify-images asks for it; leave one out"
    if ns.tolerance is not None and ns.verify == 0:
        return "argument --tolerance: applies to --verify, which is 0; leave it out"
    return None


def _read_images(items: list[str], what: str, max_pixels: int | None) -> list:
    """PIL images of every readable file in ``items``; unreadable ones are reported and left out."""
    from ..data.images import list_images, load_image
    from ..errors import ImageReadError

    images = []
    for p in list_images(items):
        try:
            images.append(load_image(p, max_pixels=max_pixels))
        except ImageReadError as exc:
            report(f"{what} {exc}; skipped")
    return images


def _note_other_classes(det, class_name: str | None) -> None:
    """A note when the detector holds references or thresholds, but none for the exported class."""
    from ..eval.files import display_text

    name = class_name or "object"
    for what, held, found in (("references", det.references, det.reference_for(name)),
                              ("thresholds", det.thresholds, det.thresholds_for(name))):
        if held and found is None:
            classes = ", ".join(repr(display_text(c)) for c in sorted(held))
            report(f"note: the detector's {what} are for class(es) {classes}, none for '{display_text(name)}': the "
                   f"model is exported without them; give --class-name to export one of those classes")


def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from ..deploy import export as ex
    from ..eval.files import display_path

    det = build_detector(args)
    refusal = ex.export_refusal(det)
    if refusal:  # before reading references: a saved --detector may have been built with tta=True
        from ..errors import InvalidValueError

        raise InvalidValueError(f"cannot export: {refusal}")
    if args.reference:
        refs = _read_images(args.reference, "reference", max_image_pixels(args))
        if not refs:
            report("none of the --reference images could be read")
            return EXIT_FAILED_INPUTS
        det.set_reference(refs, class_name=args.class_name)
    _note_other_classes(det, args.class_name)
    verify_images: np.ndarray | int = 2 if args.verify is None else args.verify
    if args.verify_images:
        from ..deploy.runtime import resize_image

        found = _read_images([args.verify_images], "verify", max_image_pixels(args))
        if args.verify:
            found = found[: args.verify]
        if not found:
            report(f"'{args.verify_images}' holds no readable images for --verify-images")
            return EXIT_FAILED_INPUTS
        size = det.model_size
        verify_images = np.stack([np.clip(np.rint(resize_image(np.asarray(im, dtype=np.float32) / 255.0, size) * 255.0), 0, 255)
                                  .astype(np.uint8) for im in found])
    precision_note = "" if det.precision in ("auto", "fp32") else f" (precision {det.precision} -> fp32)"
    result, check = ex.export_and_verify(
        det, args.out, class_name=args.class_name, input_format=args.input_format, opset=args.opset,
        verify_images=verify_images, tolerance=ex.TOLERANCE if args.tolerance is None else args.tolerance,
    )
    m = result.manifest
    h, w = m.size
    shots = f"{m.data['shots']}-shot" if m.data["shots"] else "zero-shot"
    decisions = ", with calibrated thresholds" if m.data["thresholds"] else ""
    print(f"{m.method} ({m.data['backbone']}, {h}x{w} {m.input_format}, class '{m.class_name}', {shots}{decisions}){precision_note}"
          f" -> {display_path(result.path)} ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s); manifest "
          f"{display_path(result.sidecar)}")
    if check is None:
        report("note: not verified (--verify 0)")
        return EXIT_OK
    print(check.summary())
    sys.stdout.flush()
    if not check.passed:
        report(f"{display_path(result.path)} differs from the torch detector beyond tolerance {check.tolerance:g} "
               "(the file is written, with the figures in its manifest); do not deploy it, and report the method and "
               "options as a bug")
        return EXIT_FAILED_INPUTS
    return EXIT_OK
