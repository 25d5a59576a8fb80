"""``clipad``: the command line. One module per subcommand; :mod:`.common` holds what they share.

This package is the only place that knows argparse; the library below it takes plain arguments.
Every subcommand reports each bad input on one stderr line, carries on with the rest, and exits
1 at the end with a count when anything failed (2 for usage errors such as unknown names).
Everything reaches stderr one way, as ``clipad: ...`` lines above the progress bar: :func:`main`
turns any :class:`~clipad.errors.ClipadError` into one such line (never a traceback) and prints
the library's warnings once each as ``clipad: warning: ...`` (:func:`.common.warnings_reported`).
"""

from __future__ import annotations

import argparse

from ..version import __version__
from .common import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    EXIT_USAGE,
    add_dataset_args,
    add_model_args,
    build_detector,
    dataset_from_args,
    method_options,
    report,
    warnings_reported,
)

__all__ = [
    "EXIT_FAILED_INPUTS", "EXIT_OK", "EXIT_USAGE", "add_dataset_args", "add_model_args", "build_detector",
    "build_parser", "dataset_from_args", "main", "method_options", "report",
]


def cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import list_methods

    for name in list_methods():
        print(name)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_parser
    from .convert import add_convert_parser
    from .eval import add_eval_parser
    from .predict import add_predict_parser
    from .serve import add_serve_parser
    from .train import add_train_parser

    parser = argparse.ArgumentParser(
        prog="clipad",
        description="Zero- and few-shot visual anomaly detection with a frozen CLIP: image scores and anomaly maps.",
    )
    parser.add_argument("--version", action="version", version=f"clipad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_predict_parser(sub)
    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(func=cmd_methods)
    add_eval_parser(sub)
    add_train_parser(sub)
    add_convert_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import ClipadError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    with warnings_reported():
        try:
            return int(args.func(args) or 0)
        except ClipadError as exc:  # a user's mistake (InvalidValueError... are ValueErrors too): one line
            report(str(exc))
            return EXIT_USAGE
        except OSError as exc:  # a file system or network problem (unwritable --out, disk full): not a bug
            report(str(exc))
            return EXIT_FAILED_INPUTS
        except KeyboardInterrupt:
            report("interrupted")
            return 130
