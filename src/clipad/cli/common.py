"""What the subcommands share: model and dataset options, building the detector, and the one way
errors and notes reach the terminal (:func:`report`).

Exit codes: 0 ok, 1 some inputs failed (each reported on its own line), 2 usage errors (a bad
option value, an unknown name), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2


def report(msg: str) -> None:
    """Print ``clipad: msg`` on stderr, above any progress bar (tqdm-aware), flushed.

    Undecodable bytes of file names in ``msg`` are shown as ``\\xNN``: as surrogates they would
    make a strict UTF-8 stderr (a pipe, a log capture) raise instead of printing the line."""
    from tqdm import tqdm

    from ..eval.files import display_text

    tqdm.write(f"clipad: {display_text(msg)}", file=sys.stderr)
    sys.stderr.flush()


@contextlib.contextmanager
def warnings_reported():
    """Within: every Python warning reaches stderr through :func:`report`, once per distinct line.

    A :class:`~clipad.errors.ClipadWarning` prints as ``clipad: warning: <message>`` (no category,
    file or line: the message says what and where), a :class:`~clipad.errors.SkippedInputWarning`
    as ``clipad: <message>`` like the inputs a subcommand skips itself (always shown: it explains
    the exit code), any other as ``clipad: warning: <Category>: <message>``. Warning filters apply
    as usual otherwise; the previous filters and ``warnings.showwarning`` come back on exit.
    """
    from ..errors import ClipadWarning, SkippedInputWarning

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SkippedInputWarning):
            text = str(message)
        elif issubclass(category, ClipadWarning):
            text = f"warning: {message}"
        else:
            text = f"warning: {category.__name__}: {message}"
        if text not in seen:
            seen.add(text)
            report(text)

    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedInputWarning)  # `show` prints each once
        warnings.showwarning = show
        yield


def _pretrained_arg(value: str | None):
    if value is None:
        return None
    return None if value.lower() in ("none", "random") else value


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a text with line breaks (the method options epilog) is
    printed as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _option_fields(method: str):
    import dataclasses

    from ..methods import get_method

    return dataclasses.fields(get_method(method).Options)


def _option_flags(methods: list[str]) -> dict[str, tuple]:
    """``--flag`` -> (Options field, methods that have it): the fields whose metadata names a
    ``cli`` flag (e.g. ``--checkpoint`` of the learned methods)."""
    flags: dict[str, tuple] = {}
    for m in methods:
        for f in _option_fields(m):
            if f.metadata.get("cli"):
                flags.setdefault(f.metadata["cli"], (f, []))[1].append(m)
    return flags


def _options_epilog(methods: list[str]) -> str:
    """One wrapped line per method: its options with their defaults (those with flags of their
    own, e.g. --image-size, left out)."""
    import json
    import textwrap

    own = {"image_size", "precision"}
    lines = ["method options (--set KEY=VALUE; defaults shown):"]
    for m in methods:
        items = []
        for f in _option_fields(m):
            if f.name in own or f.metadata.get("cli"):
                continue
            value = f.default if isinstance(f.default, str) else json.dumps(list(f.default) if isinstance(f.default, tuple) else f.default)
            items.append(f"{f.name}={value}")
        lines += textwrap.wrap(f"{m}: " + " ".join(items) if items else f"{m}: -", width=110,
                               initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines) + "\n"


def add_model_args(
    p: argparse.ArgumentParser, multi_method: bool = False, *, methods: list[str] | None = None,
    default_method: str = "winclip",
) -> None:
    """Model options of a subcommand. ``methods``: the ones it accepts (default: all registered);
    their option flags and an epilog listing their ``--set`` options come from the registry."""
    from ..methods import list_methods

    methods = methods or list_methods()
    p.formatter_class = _HelpFormatter
    p.epilog = _options_epilog(methods)
    g = p.add_argument_group("model")
    names = ", ".join(methods)
    if multi_method:
        g.add_argument("--method", nargs="+", default=[default_method],
                       help=f"one or more detection methods: {names} (default: {default_method})")
    else:
        g.add_argument("--method", default=default_method, help=f"detection method: {names} (default: {default_method})")
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
    for flag, (f, owners) in _option_flags(methods).items():
        help_text = f"{f.metadata.get('help', f.name)} [{', '.join(owners)}]"
        if isinstance(f.default, bool):
            g.add_argument(flag, dest=f.name, action="store_const", const=not f.default, default=None, help=help_text)
        else:
            g.add_argument(flag, dest=f.name, default=None, metavar=f.metadata.get("metavar", f.name.upper()), help=help_text)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any method option (listed below), e.g. --set scales=[2,3] --set temperature=0.05 "
                   "(values parsed as JSON when possible, else taken as text)")
    g.add_argument("--init-seed", type=int, default=0, help="seed of random weights when --pretrained none (default: 0)")
    g.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto",
                   help="backbone activation: auto (default: from a -quickgelu name, the weights or the architecture's "
                   "releases), on (QuickGELU, as OpenAI trained CLIP), off (GELU); needed for a state-dict file of "
                   "an architecture released with both, e.g. a saved OpenAI ViT-L-14 model: on")


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
    """Method options from the option flags (``--checkpoint``...: any
    Options field with ``cli`` metadata) and ``--set KEY=VALUE``; unset flags are left out."""
    import json

    from ..errors import ClipadError
    from ..methods import list_methods

    opts: dict = {}
    for f, _ in _option_flags(list_methods()).values():
        value = getattr(args, f.name, None)  # subcommands without model flags (bench) lack them
        if value is not None:
            opts[f.name] = value
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
        if args.image_size is not None:
            kwargs["image_size"] = args.image_size
        if precision:
            kwargs["precision"] = precision
        if args.pretrained is not None:
            kwargs["pretrained"] = _pretrained_arg(args.pretrained)
        if getattr(args, "quick_gelu", "auto") != "auto":
            kwargs["quick_gelu"] = args.quick_gelu == "on"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            det = api.create_detector(args.method, backbone=args.backbone, device=args.device, seed=args.init_seed, **kwargs)
        if det.backbone.pretrained is None:
            report(f"note: backbone '{det.backbone.name}' has random weights (seed {args.init_seed}); scores are for testing only")
    if getattr(args, "compile", False):
        det.compile()
    return det
