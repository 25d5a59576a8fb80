"""What the subcommands share: model and dataset options, building the detector, and the one way
errors and notes reach the terminal (:func:`report`).

Exit codes: 0 ok, 1 some inputs failed (each reported on its own line), 2 usage errors (a bad
option value, an unknown name), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

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


def pretrained_value(value: str | None) -> str | None:
    """``--pretrained`` as ``pretrained=``: 'none' or 'random' -> None (random weights)."""
    if value is None:
        return None
    return None if value.lower() in ("none", "random") else value


# --------------------------------------------------------------------------- parsing and checking options
#
# Every option value is checked while the command line is parsed (argparse ``type=`` functions
# below; checks across options in ``ClipadArgumentParser.checks``), so a bad value stops the run
# with one ``clipad: <command>: argument --flag: ...`` line and exit code 2 before anything is
# loaded or written.


class ClipadArgumentParser(argparse.ArgumentParser):
    """argparse's parser with clipad's error policy: one ``clipad: [command: ]message`` line on
    stderr and ``SystemExit(2)`` (which :func:`clipad.cli.main` returns as its exit code), where
    argparse prints a usage block and ``prog: error: ...``.

    ``checks``: callables ``(namespace) -> message | None`` run after a successful parse (checks
    across options, e.g. ``--vmin`` below ``--vmax``); the first message is the error. A check
    may also fill in defaults that depend on other options. ``hints``: callables ``(message,
    namespace) -> message | None`` that may replace an argparse error with a more specific one
    (``namespace`` holds what was parsed before the error).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checks: list[Callable[[argparse.Namespace], str | None]] = []
        self.hints: list[Callable[[str, argparse.Namespace | None], str | None]] = []
        self._partial: argparse.Namespace | None = None

    def parse_known_args(self, args=None, namespace=None):
        self._partial = namespace = argparse.Namespace() if namespace is None else namespace
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            message = check(namespace)
            if message:
                self.error(message)
        return namespace, extras

    def error(self, message: str):
        for hint in self.hints:
            better = hint(message, self._partial)
            if better:
                message = better
                break
        command = self.prog.split()[1:]  # "clipad predict" -> ["predict"]
        report(" ".join(command) + ": " + message if command else message)
        self.exit(EXIT_USAGE)


def _shown(text: str) -> str:
    return text if text and text == text.strip() else repr(text)


def _fail(text: str, expected: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"must be {expected}; got {_shown(text)}")


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        _fail(text, expected)


def _float(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        _fail(text, expected)
    if not math.isfinite(value):
        _fail(text, expected)
    return value


def _bounded(name: str, parse: Callable[[str, str], Any], expected: str, ok: Callable[[Any], bool]):
    """The argparse type ``name``: ``parse`` the text, then ``ok(value)``, else fail with ``must be {expected}``."""

    def check(text: str):
        value = parse(text, expected)
        if not ok(value):
            _fail(text, expected)
        return value

    check.__name__ = check.__qualname__ = name  # argparse names the type by it
    check.__doc__ = f"argparse type: {expected}."
    return check


positive_int = _bounded("positive_int", _int, "a positive integer", lambda v: v >= 1)
non_negative_int = _bounded("non_negative_int", _int, "an integer >= 0", lambda v: v >= 0)
# a random seed: what every generator clipad seeds accepts
seed_int = _bounded("seed_int", _int, f"an integer from 0 to {2**32 - 1}", lambda v: 0 <= v < 2**32)
port = _bounded("port", _int, "a TCP port from 0 to 65535", lambda v: 0 <= v <= 65535)  # 0: any free port
finite_float = _bounded("finite_float", _float, "a finite number", lambda v: True)  # _float refuses nan, inf
positive_float = _bounded("positive_float", _float, "a finite number > 0", lambda v: v > 0)
non_negative_float = _bounded("non_negative_float", _float, "a finite number >= 0", lambda v: v >= 0)


def non_empty(text: str) -> str:
    """argparse type: any text but an empty (or blank) one."""
    if not text.strip():
        _fail(text, "a non-empty value")
    return text


def device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present on this machine (torch
    is imported only for a non-CPU device)."""
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if not m or (m[2] is not None and m[1] != "cuda"):
        _fail(text, "cpu, cuda, cuda:N or mps")
    if m[1] == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise argparse.ArgumentTypeError(f"no CUDA device is visible (got {text}); use --device cpu")
        if m[2] is not None and int(m[2]) >= n:
            raise argparse.ArgumentTypeError(f"{text} does not exist: {n} CUDA device(s) visible (cuda:0 to cuda:{n - 1})")
    elif m[1] == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("mps (Apple GPU) is not available on this machine; use --device cpu")
    return text


def _first_existing(path: Path) -> Path | None:
    """``path`` or its nearest ancestor that exists (None: none does, e.g. a relative path's)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return None


def existing_file(text: str) -> str:
    """argparse type: a file that exists."""
    non_empty(text)
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a directory; expected a file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"'{text}' does not exist")
    return text


def existing_dir(text: str) -> str:
    """argparse type: a directory that exists."""
    non_empty(text)
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a file; expected a directory")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"directory '{text}' does not exist")
    return text


def existing_path(text: str) -> str:
    """argparse type: a file or directory that exists."""
    non_empty(text)
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"'{text}' does not exist")
    return text


def output_dir(text: str) -> str:
    """argparse type: a directory to write into: an existing directory, or a path that can become
    one (not an existing file, nor under one)."""
    non_empty(text)
    found = _first_existing(Path(text))
    if found is not None and not found.is_dir():
        where = "is a file" if str(found) == str(Path(text)) else f"is under the file '{found}'"
        raise argparse.ArgumentTypeError(f"'{text}' {where}; give a directory (it is created if missing)")
    return text


def output_file(text: str) -> str:
    """argparse type: a file to write: not an existing directory, nor under an existing file."""
    non_empty(text)
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a directory; give a file name")
    found = _first_existing(p.parent) if str(p.parent) not in ("", ".") else None
    if found is not None and not found.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is under the file '{found}'; give a path in a directory")
    return text


def key_value(text: str) -> str:
    """argparse type of ``--set``: ``KEY=VALUE`` with a non-empty key (the value is checked
    against the method's options once the method is known)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        _fail(text, "KEY=VALUE, e.g. scales=[2,3]")
    return text


def pretrained_source(text: str) -> str:
    """argparse type of ``--pretrained``: ``none``/``random``, an open_clip tag, or a weights file
    that exists (a value with a path separator or a weights suffix is taken as a file)."""
    non_empty(text)
    p = Path(text)
    looks_like_file = (os.sep in text or "/" in text or p.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a directory; expected an open_clip tag, a weights file or 'none'")
    if looks_like_file and not p.is_file():
        raise argparse.ArgumentTypeError(f"weights file '{text}' does not exist; expected an open_clip tag "
                                         "(e.g. laion400m_e31), a weights file or 'none'")
    return text


def backbone_name(text: str) -> str:
    """argparse type of ``--backbone``: ``tiny``, an open_clip ViT architecture or a DINOv2 name (checked as
    :func:`clipad.create_detector` does; imports open_clip)."""
    from ..backbones import check_backbone_name
    from ..errors import ClipadError

    non_empty(text)
    try:
        check_backbone_name(text)
    except ClipadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def method_name(methods: list[str], extra: tuple[str, ...] = (), why: str = "") -> Callable[[str], str]:
    """argparse type: one of ``methods`` (or of ``extra``, e.g. ``all``). ``why``: why a registered
    method not in ``methods`` is refused (train: "has nothing to train")."""
    from ..methods import list_methods

    def method(text: str) -> str:
        if text in methods or text in extra:
            return text
        valid = ", ".join([*methods, *extra])
        if why and text in list_methods():
            raise argparse.ArgumentTypeError(f"method '{text}' {why}; use one of: {valid}")
        raise argparse.ArgumentTypeError(f"unknown method '{_shown(text)}'. Valid names: {valid}")

    method.__name__ = "method"
    return method


def check_method_options(methods: list[str], items: list[tuple[str, str, object]]) -> str | None:
    """The first problem of method options ``items`` = [(flag, option name, value)] for each of
    ``methods``, as an argparse error naming the flag; each option alone, then all together."""
    from ..errors import ClipadError
    from ..methods import get_method, list_methods
    from ..methods.base import make_options

    for m in methods:
        cls = get_method(m)
        valid = {f.name for f in _option_fields(m)}
        for flag, key, value in items:
            if key not in valid:
                owners = _option_flags(list_methods()).get(flag, (None, []))[1]  # none for --set
                if owners:
                    return f"argument {flag}: applies to {', '.join(owners)}, not to method '{m}'"
                return (f"argument {flag}: method '{m}' has no option '{key}'; its options: "
                        f"{', '.join(sorted(valid))}")
            try:
                make_options(cls, {key: value})
            except ClipadError as exc:
                return f"argument {flag}: {exc}"
        try:
            make_options(cls, {key: value for _, key, value in items})
        except ClipadError as exc:
            return f"argument {'/'.join(dict.fromkeys(flag for flag, _, _ in items))}: {exc}"
    return None


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
    p: ClipadArgumentParser, multi_method: bool = False, *, methods: list[str] | None = None,
    default_method: str = "winclip", why_not: str = "",
) -> None:
    """Model options of a subcommand. ``methods``: the ones it accepts (default: all registered;
    ``why_not``: why another registered one is refused); their option flags and an epilog listing
    their ``--set`` options come from the registry. Registers :func:`_model_check` on ``p``."""
    from ..methods import list_methods

    methods = methods or list_methods()
    p.formatter_class = _HelpFormatter
    p.epilog = _options_epilog(methods)
    g = p.add_argument_group("model")
    names = ", ".join(methods)
    method_type = method_name(methods, why=why_not)
    if multi_method:
        g.add_argument("--method", nargs="+", action="extend", type=method_type, default=None,
                       help=f"one or more detection methods: {names} (default: {default_method})")
    else:
        g.add_argument("--method", type=method_type, default=None, help=f"detection method: {names} (default: {default_method})")
    g.add_argument(
        "--backbone", type=backbone_name, default=None,
        help="'tiny' or an open_clip architecture, e.g. ViT-B-16-plus-240 (default: the method's paper backbone)",
    )
    g.add_argument(
        "--pretrained", type=pretrained_source, default=None,
        help="open_clip tag (e.g. laion400m_e31), a checkpoint file, or 'none' for random weights "
        "(default: the method's tag for its default backbone; 'none' for tiny); with --detector: the backbone "
        "weights to load instead of the ones the file records (e.g. a local file when offline)",
    )
    g.add_argument("--detector", type=existing_file, default=None, metavar="FILE",
                   help="a detector saved with det.save() (.safetensors); it records the method, backbone, image "
                   "size, seed and method options: --method, --backbone, --image-size, --init-seed, --set and "
                   "method option flags may be given only with the values it records (an error otherwise); "
                   "--pretrained, --quick-gelu, --device, --precision, --batch-size and --compile apply to it")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="model input size in pixels, a multiple of the backbone's patch size (default: the method's)")
    g.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ..., mps (default: cuda when available)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (default: 8)")
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
            g.add_argument(flag, dest=f.name, default=None, metavar=f.metadata.get("metavar", f.name.upper()),
                           # a FILE (--checkpoint) must exist; other values are checked with the method
                           type=existing_file if f.metadata.get("metavar") == "FILE" else non_empty,
                           help=help_text)
    g.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="any method option (listed below), e.g. --set scales=[2,3] --set temperature=0.05 "
                   "(values parsed as JSON when possible, else taken as text)")
    g.add_argument("--init-seed", type=seed_int, default=None,
                   help="seed of random weights when --pretrained none (default: 0)")
    g.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto",
                   help="backbone activation: auto (default: from a -quickgelu name, the weights or the architecture's "
                   "releases), on (QuickGELU, as OpenAI trained CLIP), off (GELU); needed for a state-dict file of "
                   "an architecture released with both, e.g. a saved OpenAI ViT-L-14 model: on")
    # p: a ClipadArgumentParser (build_parser makes every subparser one)
    p.checks.append(lambda ns: _model_check(ns, [default_method] if multi_method else default_method))


def option_items(args: argparse.Namespace) -> list[tuple[str, str, object]]:
    """[(flag, option name, value)] of the method option flags given (``--checkpoint``...: any
    Options field with ``cli`` metadata) and of each ``--set KEY=VALUE`` (values parsed as JSON
    when possible, else text), in command-line order within each kind."""
    import json

    from ..methods import list_methods

    items: list[tuple[str, str, object]] = []
    for flag, (f, _) in _option_flags(list_methods()).items():
        value = getattr(args, f.name, None)  # subcommands without model flags (bench) lack them
        if value is not None:
            items.append((flag, f.name, value))
    for item in getattr(args, "set", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            from ..errors import InvalidValueError

            raise InvalidValueError(f"--set expects KEY=VALUE; got '{item}'")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        items.append(("--set", key.strip().replace("-", "_"), parsed))
    return items


def _model_check(ns: argparse.Namespace, default_method) -> str | None:
    """Checks across the model options, after parsing: every method option fits every chosen
    method. Fills in the defaults of --method and --init-seed; with --detector they stay None
    (not given), and :func:`build_detector` compares what was given with what the file records."""
    if ns.detector:
        if isinstance(ns.method, list) and len(ns.method) > 1:
            return "argument --method: one method with --detector (the saved detector's); give one or leave it out"
        return None
    if ns.method is None:
        ns.method = default_method
    if ns.init_seed is None:
        ns.init_seed = 0
    methods = ns.method if isinstance(ns.method, list) else [ns.method]
    items = option_items(ns)
    if ns.image_size is not None:
        items.append(("--image-size", "image_size", ns.image_size))
    if getattr(ns, "precision", None):
        items.append(("--precision", "precision", ns.precision))
    return check_method_options(methods, items)


def add_dataset_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """--dataset/--root and each layout's own options (shared by eval, train and calibrate).
    Registers :func:`_dataset_check` on ``p``. ``optional``: --dataset may be left out (the
    subcommand takes other inputs instead, as calibrate's images; --class-name then names theirs)."""
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", required=not optional, choices=["mvtec", "visa", "meta", "folder"], help="dataset layout")
    g.add_argument("--root", required=not optional, type=existing_dir, help="dataset root directory")
    g.add_argument("--normal-dir", action="append", default=[], type=non_empty,
                   help="folder layout: a normal-image directory under --root (repeatable)")
    g.add_argument("--abnormal-dir", action="append", default=[], type=non_empty,
                   help="folder layout: an anomalous-image directory under --root (repeatable)")
    g.add_argument("--mask-dir", action="append", default=[], type=non_empty,
                   help="folder layout: mask directory under --root, masks matched by file stem (repeatable)")
    g.add_argument("--class-name", default=None, type=non_empty, help="folder layout: class name (default: the root folder's name)")
    g.add_argument("--meta-path", default=None, type=existing_file, help="meta layout: path of meta.json (default: ROOT/meta.json)")
    g.add_argument("--split-csv", default=None, type=existing_file,
                   help="visa layout: split file (default: ROOT/split_csv/1cls.csv)")
    checks = getattr(p, "checks", None)
    if checks is not None:
        checks.append(_dataset_check)


#: dest -> (flag, the --dataset layout it belongs to)
_LAYOUT_OPTIONS = {"normal_dir": ("--normal-dir", "folder"), "abnormal_dir": ("--abnormal-dir", "folder"),
                   "mask_dir": ("--mask-dir", "folder"), "class_name": ("--class-name", "folder"),
                   "meta_path": ("--meta-path", "meta"), "split_csv": ("--split-csv", "visa")}


def _dataset_check(ns: argparse.Namespace) -> str | None:
    """A layout's options only with that layout; the folder layout's directories exist under --root."""
    if ns.dataset is None:  # an optional dataset left out: none of its options (--class-name names the inputs' class)
        given = ["--root"] if ns.root is not None else []
        given += [flag for dest, (flag, _) in _LAYOUT_OPTIONS.items()
                  if dest != "class_name" and getattr(ns, dest) not in (None, [])]
        return f"argument {given[0]}: only with --dataset; leave it out" if given else None
    for dest, (flag, layout) in _LAYOUT_OPTIONS.items():
        if getattr(ns, dest) not in (None, []) and ns.dataset != layout:
            return f"argument {flag}: only for --dataset {layout} (got --dataset {ns.dataset}); leave it out"
    if ns.root is None:
        return "argument --root: required with --dataset"
    if ns.dataset != "folder":
        return None
    if not ns.normal_dir and not ns.abnormal_dir:
        return "argument --normal-dir/--abnormal-dir: --dataset folder needs at least one (relative to --root)"
    for dest in ("normal_dir", "abnormal_dir", "mask_dir"):
        for d in getattr(ns, dest):
            if not (Path(ns.root) / d).is_dir():
                return f"argument {_LAYOUT_OPTIONS[dest][0]}: no directory '{d}' under --root '{ns.root}'"
    return None


def dataset_from_args(args: argparse.Namespace):
    """The :class:`~clipad.data.AnomalyDataset` that :func:`add_dataset_args` options name."""
    from ..data import create_dataset

    opts: dict = {}
    if args.dataset == "folder":
        opts = {"normal_dirs": args.normal_dir, "abnormal_dirs": args.abnormal_dir,
                "mask_dirs": args.mask_dir, "class_name": args.class_name}
    elif args.dataset == "meta" and args.meta_path:
        opts["meta_path"] = args.meta_path
    elif args.dataset == "visa" and args.split_csv:
        opts["split_csv"] = args.split_csv
    return create_dataset(args.dataset, args.root, **opts)


def method_options(args: argparse.Namespace) -> dict:
    """Method options from the option flags (``--checkpoint``...: any Options field with ``cli``
    metadata) and ``--set KEY=VALUE``; unset flags are left out."""
    return {key: value for _, key, value in option_items(args)}


def build_detector(args: argparse.Namespace):
    """The detector the model options name: ``--detector FILE`` restored (with ``--pretrained``
    and ``--quick-gelu`` applied to its backbone), or a new one."""
    from .. import api

    precision = getattr(args, "precision", None)
    quick_gelu = {"on": True, "off": False}.get(getattr(args, "quick_gelu", "auto"))
    if args.detector:
        kwargs = {} if args.pretrained is None else {"pretrained": pretrained_value(args.pretrained)}
        if quick_gelu is not None:
            kwargs["quick_gelu"] = quick_gelu
        det = api.load_detector(args.detector, device=args.device, **kwargs)
        _check_matches_saved(det, args)
        if precision:
            det.precision = precision
    else:
        kwargs = method_options(args)
        if args.image_size is not None:
            kwargs["image_size"] = args.image_size
        if precision:
            kwargs["precision"] = precision
        if args.pretrained is not None:
            kwargs["pretrained"] = pretrained_value(args.pretrained)
        if quick_gelu is not None:
            kwargs["quick_gelu"] = quick_gelu
        seed = args.init_seed or 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            det = api.create_detector(args.method, backbone=args.backbone, device=args.device, seed=seed, **kwargs)
        if det.backbone.pretrained is None:
            report(f"note: backbone '{det.backbone.name}' has random weights (seed {seed}); scores are for testing only")
    if getattr(args, "compile", False):
        det.compile()
    return det


def _check_matches_saved(det, args: argparse.Namespace) -> None:
    """Model options given with --detector must equal what the file records: a different value
    could not take effect (InvalidValueError naming the first that differs)."""
    from ..errors import ClipadError, InvalidValueError
    from ..methods.base import make_options

    method = args.method[0] if isinstance(args.method, list) else args.method
    given: list[tuple[str, object, object]] = [  # (flag, given, recorded)
        ("--method", method, det.name), ("--backbone", args.backbone, det.backbone.name),
        ("--image-size", args.image_size, det.image_size), ("--init-seed", getattr(args, "init_seed", None), det.seed),
    ]
    for flag, key, value in option_items(args):
        try:
            value = getattr(make_options(type(det), {key: value}), key)
        except ClipadError as exc:
            raise InvalidValueError(f"{flag}: {exc} (the method of --detector '{args.detector}')") from None
        given.append((f"{flag} {key}" if flag == "--set" else flag, value, getattr(det.opts, key)))
    for flag, value, recorded in given:
        if value is not None and value != recorded:
            raise InvalidValueError(
                f"{flag} {value!r} differs from what the saved --detector '{args.detector}' records ({recorded!r}); "
                "leave it out, or build a new detector without --detector"
            )


def add_max_image_pixels_arg(p: argparse.ArgumentParser) -> None:
    """``--max-image-pixels MP`` of the subcommands that read image files (predict, eval): the
    name and unit of serve's per-image budget; :func:`max_image_pixels` turns it into pixels."""
    p.add_argument("--max-image-pixels", type=positive_float, default=None, metavar="MP",
                   help="largest width*height of an input image, in megapixels, checked before decoding; larger "
                   "files are reported and skipped (default: Pillow's decompression-bomb limit, about 179 MP)")


def max_image_pixels(args: argparse.Namespace) -> int | None:
    """``--max-image-pixels`` in pixels, the ``max_pixels`` of the image readers (None: Pillow's limit)."""
    mp = getattr(args, "max_image_pixels", None)
    return None if mp is None else max(1, round(mp * 1_000_000))


# --------------------------------------------------------------------------- scale-out (Ray Data)

_RAY_ADDRESS = re.compile(r"(?:ray://)?[A-Za-z0-9._-]+:(\d+)")


def ray_address(text: str) -> str:
    """argparse type of ``--ray``: ``local``, ``auto`` or a cluster's ``HOST:PORT`` /
    ``ray://HOST:PORT`` (``ray start --head`` prints it); checked without importing ray."""
    expected = ("'local', 'auto', HOST:PORT or ray://HOST:PORT (a cluster from `ray start --head`); for a local "
                "instance give --ray with no value after the images")
    if text in ("local", "auto"):
        return text
    m = _RAY_ADDRESS.fullmatch(text)
    if not m or not 1 <= int(m[1]) <= 65535:
        _fail(text, expected)
    return text


#: dest -> flag of the options that only --ray uses
_RAY_ONLY = {"actors": "--actors", "gpus_per_actor": "--gpus-per-actor", "resume": "--resume"}


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--actors``, ``--gpus-per-actor`` and ``--resume`` of predict and eval
    (:mod:`clipad.distributed`; needs ``pip install "clipad[ray]"``). Registers :func:`_ray_check`."""
    g = p.add_argument_group('scale-out on Ray Data (pip install "clipad[ray]"; see docs/scale.md)')
    g.add_argument("--ray", nargs="?", const="local", default=None, type=ray_address, metavar="ADDRESS",
                   help="score on Ray Data: detector actors fed by CPU decode tasks, results in shards under --out; "
                   "no value: a local Ray instance on this machine's CPUs/GPUs; ADDRESS: an existing cluster")
    g.add_argument("--actors", type=positive_int, default=None, metavar="N",
                   help="detector actors, i.e. model copies (default: 1)")
    g.add_argument("--gpus-per-actor", type=non_negative_float, default=None, metavar="F",
                   help="GPUs per actor, fractions allowed (default: 0, CPU actors)")
    g.add_argument("--resume", action="store_true",
                   help="keep the shards an interrupted --ray run wrote to --out and score only the rest")
    p.checks.append(_ray_check)


def _ray_check(ns: argparse.Namespace) -> str | None:
    if ns.ray is None:
        given = [flag for dest, flag in _RAY_ONLY.items() if getattr(ns, dest) not in (None, False)]
        return f"argument {given[0]}: only with --ray; add --ray (a local instance) or --ray ADDRESS" if given else None
    return None


def ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`clipad.distributed.predict` / ``evaluate`` from the --ray options."""
    return {"address": None if args.ray == "local" else args.ray, "actors": args.actors or 1,
            "gpus_per_actor": args.gpus_per_actor or 0.0, "resume": args.resume}
