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
import importlib
import sys
from collections.abc import Iterable

from ..version import __version__
from .common import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    EXIT_USAGE,
    ClipadArgumentParser,
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


#: Subcommands in the order ``clipad --help`` lists them, with that listing's one-line summary.
#: The summaries are plain text so that the listing imports nothing: each subcommand's own
#: options (some read from the method registry, which needs torch) are built only when it runs.
COMMANDS: dict[str, str] = {
    "predict": "score images and write heatmaps",
    "methods": "list the registered methods",
    "eval": "evaluate methods on MVTec AD, VisA, a meta.json list or folders",
    "calibrate": "calibrate pass/fail thresholds from normal or labelled images",
    "export": "export a detector to ONNX (checked against the torch detector)",
    "train": "train a learned method on an auxiliary dataset",
    "convert": "import an official checkpoint into clipad's format",
    "bench": "measure throughput of methods and the bare backbone",
    "serve": "HTTP inspection service with a web page",
}


def _add_command(sub, name: str) -> None:
    """Add subcommand ``name`` with all its options (imports its module, ``clipad.cli.<name>``)."""
    if name == "methods":
        sub.add_parser("methods", help=COMMANDS["methods"]).set_defaults(func=cmd_methods)
        return
    module = importlib.import_module(f"{__name__}.{name}")
    getattr(module, f"add_{name}_parser")(sub)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``clipad`` parser. ``commands``: the subcommands built with their options (default:
    all); the others are listed by name and summary only and cannot parse their options."""
    built = set(COMMANDS if commands is None else commands)
    parser = ClipadArgumentParser(  # one-line usage errors; its subparsers are of the same class
        prog="clipad",
        description="Zero- and few-shot visual anomaly detection with a frozen CLIP: image scores and anomaly maps.",
    )
    parser.add_argument("--version", action="version", version=f"clipad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name in built:
            _add_command(sub, name)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first argument not starting with '-' (the top-level
    options take no value), if that is a subcommand."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    from ..errors import ClipadError

    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the subcommand that runs is built: `clipad --version` / `--help` import no torch.
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # 2: a bad option or value, its one `clipad:` line out; 0: --help, --version
        if exc.code != EXIT_USAGE:
            raise
        return EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    with warnings_reported():
        try:
            return int(args.func(args) or 0)
        except ClipadError as exc:  # a user's mistake (InvalidValueError... are ValueErrors too): one line
            report(exc.cli_message or str(exc))  # its fix in flags where it words it for Python otherwise
            return EXIT_USAGE
        except OSError as exc:  # a file system or network problem (unwritable --out, disk full): not a bug
            report(str(exc))
            return EXIT_FAILED_INPUTS
        except KeyboardInterrupt:
            report("interrupted")
            return 130
