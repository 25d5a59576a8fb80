"""clipad's checkpoint format: one ``.safetensors`` file, configuration in its header.

Tensors: ``learned.<name>`` (a method's learned weights) and ``reference.<i>.<name>`` (reference
memory of the i-th class in the header's ``reference_classes`` list). Header metadata (strings),
schema :data:`HEADER`: ``format`` = "clipad", ``clipad_version``, ``method``, ``backbone``,
``pretrained`` (JSON), ``seed``, ``image_size``, ``precision``, ``options`` (JSON object),
``reference_classes`` (JSON list), and optionally ``quick_gelu`` (JSON bool: the backbone's
activation), for a converted official checkpoint, ``converted_from`` (JSON), and for a
calibrated detector ``thresholds`` (JSON object: class -> decision thresholds, see
:func:`_check_thresholds`). Nothing is ever unpickled.

Reading checks, in this order and before any tensor is read: the file's first 8 bytes (an official
PyTorch ``.pth``, a zip or a pickle, is told to go through ``clipad convert``), the safetensors
header length against :data:`MAX_HEADER_BYTES` and the file size, the tensor count and names,
then every header entry against its type, range and size. The tensors are then read and must be
finite. Every problem is one :class:`~clipad.errors.CheckpointError` naming the file, the entry,
what is wrong and the fix, in at most :data:`MAX_ERROR` characters. Writing applies the same
schema, so what clipad writes it reads back.

This module knows the format only: it writes and reads plain data (names, JSON-able options,
tensors) and never a detector, so it sits below the methods that use it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, InvalidValueError, MissingFileError, shorten

FORMAT = "clipad"

#: Largest ``image_size`` a header (and any method's options) may hold. 8x the largest input of any
#: method (518 px); a ViT/16 at 4096 px already has 65,536 tokens, whose attention matrix alone
#: would not fit a GPU. A bound that stops a typo or an edited header from allocating without end.
MAX_IMAGE_SIZE = 4096
#: Largest safetensors header (its JSON: tensor entries and metadata). The metadata entries are
#: bounded below (options 64 KiB...), :data:`MAX_TENSORS` entries take ~2 MB: 16 MiB is ample,
#: and a larger length field means a damaged file or not a safetensors file at all.
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Most tensors a checkpoint may hold (the largest method saves ~60; reference sets add a few per class).
MAX_TENSORS = 20_000
#: Longest tensor name (a learned weight's module path, ``reference.<i>.<name>``).
MAX_TENSOR_NAME = 256
#: Most characters of a checkpoint error (the quoted path and value are shortened to fit).
MAX_ERROR = 500

#: What the reader says when the file is not what clipad wrote.
FIX = ("the file was edited by hand or is damaged: re-save the detector (det.save), or rerun the clipad train / "
       "clipad convert that wrote it")

_OFFICIAL = ("looks like an official checkpoint (a PyTorch pickle: clipad never unpickles one); convert it first: "
             "clipad convert --from {method} {path} OUT.safetensors")


@dataclass
class Converted:
    """What a converter of official checkpoints returns: learned tensors (named as the method's
    ``learned_state``), the detector options they imply, notes on dropped keys, and the paper's
    input size (recorded in the header when the options leave ``image_size`` None)."""

    method: str
    learned: dict[str, torch.Tensor]
    options: dict[str, Any]
    dropped: list[str] = field(default_factory=list)
    image_size: int | None = None


# --------------------------------------------------------------------------- header schema


class _Problem(Exception):
    """One thing wrong with a header: ``where`` (e.g. "header entry 'seed'") and ``what``."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(where, what)
        self.where, self.what = where, what


def _quote(value: Any, limit: int = 60) -> str:
    return repr(shorten(value, limit)) if isinstance(value, str) else shorten(value, limit)


def _json_kind(value: Any) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


_INT64 = (-(2**63), 2**63 - 1)
MAX_OPTION_TEXT = 4096  # a path (PATH_MAX)
MAX_OPTION_LIST = 1024
MAX_OPTIONS = 256
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 256


def _option_scalar(value: Any) -> str | None:
    """What is wrong with one option value (a JSON scalar), or None."""
    if isinstance(value, str):
        return f"is a string of {len(value)} characters (at most {MAX_OPTION_TEXT})" if len(value) > MAX_OPTION_TEXT else None
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return f"is an integer of {len(str(value))} digits (it must fit 64 bits)"
    if value is None or isinstance(value, (bool, int, float)):
        return None
    return f"is {_json_kind(value)} (option values are JSON scalars or lists of them)"


def _check_options(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must be a JSON object of option values; got {_json_kind(value)}"
    if len(value) > MAX_OPTIONS:
        return f"holds {len(value)} options (at most {MAX_OPTIONS})"
    for name, v in value.items():
        if len(name) > 64 or not name.isidentifier():
            return f"has an option name {_quote(name)} that is not an identifier of at most 64 characters"
        if isinstance(v, list):
            if len(v) > MAX_OPTION_LIST:
                return f"has option '{name}' that is a list of {len(v)} values (at most {MAX_OPTION_LIST})"
            bad = next((p for p in map(_option_scalar, v) if p), None)
            if bad:
                return f"has option '{name}' with an item that {bad}"
        elif (bad := _option_scalar(v)) is not None:
            return f"has option '{name}' that {bad}"
    return None


def _check_classes(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"must be a JSON list of class names; got {_json_kind(value)}"
    if len(value) > MAX_CLASSES:
        return f"lists {len(value)} classes (at most {MAX_CLASSES})"
    for name in value:
        if not isinstance(name, str) or len(name) > MAX_CLASS_NAME:
            return f"has an item {_quote(name)} that is not a string of at most {MAX_CLASS_NAME} characters"
    if len(set(value)) != len(value):
        return "names a class twice"
    return None


#: Keys of one class's entry of ``thresholds`` (``clipad.methods.base.Thresholds.to_json``).
THRESHOLD_KEYS = ("image", "pixel", "image_range", "pixel_range", "provenance")
MAX_PROVENANCE = 64


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_thresholds(value: Any) -> str | None:
    """``{class: {"image": number|null, "pixel": number|null, "image_range": [lo, hi]|null,
    "pixel_range": [lo, hi]|null, "provenance": {name: JSON scalar}}}``; "" = every class without
    its own; a range only beside its threshold."""
    if not isinstance(value, dict):
        return f"must be a JSON object (class -> thresholds); got {_json_kind(value)}"
    if len(value) > MAX_CLASSES:
        return f"holds {len(value)} classes (at most {MAX_CLASSES})"
    for name, entry in value.items():
        where = f"class {_quote(name)}"
        if len(name) > MAX_CLASS_NAME:
            return f"has a class name longer than {MAX_CLASS_NAME} characters"
        if not isinstance(entry, dict):
            return f"{where} is {_json_kind(entry)}, not a JSON object"
        unknown = sorted(set(entry) - set(THRESHOLD_KEYS))
        if unknown:
            return f"{where} has unknown key(s) {_quote(unknown)} (known: {', '.join(THRESHOLD_KEYS)})"
        for level in ("image", "pixel"):
            thr, rng = entry.get(level), entry.get(f"{level}_range")
            if thr is not None and not _finite(thr):
                return f"{where}: '{level}' must be a finite number or null; got {_quote(thr)}"
            if rng is None:
                continue
            if thr is None:
                return f"{where}: '{level}_range' is given without a '{level}' threshold"
            if not (isinstance(rng, list) and len(rng) == 2 and all(map(_finite, rng)) and rng[0] <= rng[1]):
                return f"{where}: '{level}_range' must be [min, max], finite numbers, min <= max; got {_quote(rng)}"
        prov = entry.get("provenance", {})
        if not isinstance(prov, dict) or len(prov) > MAX_PROVENANCE:
            return f"{where}: 'provenance' must be a JSON object of at most {MAX_PROVENANCE} entries"
        for key, v in prov.items():
            bad = _option_scalar(v) or (None if v is None or isinstance(v, (str, bool)) or _finite(v) else "is not finite")
            if len(key) > 64 or not key.isidentifier() or bad:
                return f"{where}: provenance entry {_quote(key)} " + (bad or "is not an identifier of at most 64 characters")
    return None


def _is(kind: type, words: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        return None if ok else f"must be {words}; got {_json_kind(value)} {_quote(value)}"
    return check


@dataclass(frozen=True)
class Entry:
    """One header entry: stored as ``text`` (as is), ``int`` (decimal) or ``json``; whether files
    must have it; its longest stored form; ``check`` of the decoded value (what is wrong, or None);
    ``range`` of an ``int``."""

    kind: str
    required: bool
    limit: int
    check: Callable[[Any], str | None] | None = None
    range: tuple[int, int] | None = None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+:/@-]*")


def _check_name(value: str) -> str | None:
    return None if _NAME.fullmatch(value) else f"must be a name (letters, digits, '-_.+:/@'); got {_quote(value)}"


#: The header schema. Limits: names are short (a method, an open_clip architecture), ``pretrained``
#: a tag or a path, ``options`` 64 KiB (the largest method's options take ~1 KB), the class list
#: 1 MiB, ``seed`` what ``torch.manual_seed`` takes, ``image_size`` 1..MAX_IMAGE_SIZE.
HEADER: dict[str, Entry] = {
    "format": Entry("text", True, 32),
    "clipad_version": Entry("text", False, 64),
    "method": Entry("text", True, 64, _check_name),
    "backbone": Entry("text", True, 128, _check_name),
    "pretrained": Entry("json", True, MAX_OPTION_TEXT + 2,
                        lambda v: None if v is None else _is(str, "a string (a tag or a file) or null")(v)),
    "seed": Entry("int", True, 21, range=(-(2**63), 2**64 - 1)),
    "image_size": Entry("int", True, 8, range=(1, MAX_IMAGE_SIZE)),
    "precision": Entry("text", True, 16, _check_name),
    "options": Entry("json", True, 64 * 1024, _check_options),
    "reference_classes": Entry("json", True, 1024 * 1024, _check_classes),
    "quick_gelu": Entry("json", False, 8, _is(bool, "true or false")),
    "converted_from": Entry("json", False, 64 * 1024, _is(dict, "a JSON object")),
    "thresholds": Entry("json", False, 4 * 1024 * 1024, _check_thresholds),
}


def _decode(key: str, entry: Entry, raw: Any) -> Any:
    where = f"header entry '{key}'"
    if not isinstance(raw, str):
        raise _Problem(where, f"must be a string; got {_json_kind(raw)}")
    if len(raw) > entry.limit:
        raise _Problem(where, f"is {len(raw)} characters long (at most {entry.limit})")
    if entry.kind == "int":
        if not re.fullmatch(r"-?[0-9]+", raw):
            raise _Problem(where, f"must be an integer; got {_quote(raw)}")
        value: Any = int(raw)
        lo, hi = entry.range or _INT64
        if not lo <= value <= hi:
            raise _Problem(where, f"must be an integer in [{lo}, {hi}]; got {value}")
    elif entry.kind == "json":
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _Problem(where, f"is not valid JSON ({shorten(str(exc), 80)}): {_quote(raw, 40)}") from None
    else:
        value = raw
    problem = entry.check(value) if entry.check else None
    if problem:
        raise _Problem(where, problem)
    return value


def decode_header(meta: Mapping[str, Any], tensor_names: Iterable[str]) -> dict[str, Any]:
    """The header ``meta`` (strings, as stored) decoded and checked against :data:`HEADER`, with
    the ``tensor_names`` it describes. Entries outside the schema are kept as stored.

    Raises:
        _Problem: the first thing wrong (internal: the reader and the writer word it).
    """
    if meta.get("format") != FORMAT:
        raise _Problem("header", "has no 'format: clipad' entry: it is not a clipad checkpoint (an official "
                                 "checkpoint must be converted first: clipad convert)")
    out: dict[str, Any] = dict(meta)
    for key, entry in HEADER.items():
        if key not in meta:
            if entry.required:
                raise _Problem(f"header entry '{key}'", "is missing")
            continue
        out[key] = _decode(key, entry, meta[key])
    opts = out["options"]
    for key in ("image_size", "precision"):
        if opts.get(key) is not None and opts[key] != out[key]:
            raise _Problem(f"header entry '{key}'", f"is {_quote(out[key])} but the options say {_quote(opts[key])}")
    classes = len(out["reference_classes"])
    names = list(tensor_names)
    if len(names) > MAX_TENSORS:
        raise _Problem("tensor list", f"has {len(names)} tensors (at most {MAX_TENSORS})")
    for name in names:
        where = f"tensor {_quote(name)}"
        if len(name) > MAX_TENSOR_NAME:
            raise _Problem(where, f"has a name longer than {MAX_TENSOR_NAME} characters")
        if name.startswith("learned.") and len(name) > len("learned."):
            continue
        m = re.fullmatch(r"reference\.(0|[1-9][0-9]{0,8})\.(.+)", name)
        if not m:
            raise _Problem(where, "is neither 'learned.<name>' nor 'reference.<i>.<name>'")
        if int(m.group(1)) >= classes:
            raise _Problem(where, f"refers to class {m.group(1)}, but 'reference_classes' lists {classes}")
    return out


# --------------------------------------------------------------------------- writing


def _file_mode() -> int:
    """The mode :func:`open` gives a new file (0o666 less the umask), read without changing the
    umask where the system tells it (Linux ``/proc``), else by setting it back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """``safetensors.torch.save_file`` with the file mode any other file gets (0644 under the usual
    umask): safetensors writes through a private temporary file, mode 0600, renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(dict(tensors), str(path), metadata=dict(metadata))
    os.chmod(path, _file_mode())
    return path


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or infinite values."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_checkpoint(
    path: str | Path,
    *,
    method: str,
    backbone: str,
    pretrained: str | None,
    seed: int,
    image_size: int,
    precision: str,
    options: Mapping[str, Any],
    learned: Mapping[str, torch.Tensor],
    references: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one clipad checkpoint.

    Args:
        method / backbone / pretrained / seed / image_size / precision: the header fields.
        options: the method's options, JSON-able (what ``create_detector(method, **options)`` takes).
        learned: learned tensors by name, stored as float32.
        references: ``{class_name: {name: tensor}}`` reference memories ("" = the default set).
        extra: more JSON-able header entries (e.g. ``converted_from``, ``quick_gelu``).

    Raises:
        InvalidValueError: a value the header schema does not allow (what would not read back),
            or learned / reference tensors with NaN or infinite values (a diverged training run).
    """
    from .version import __version__

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in learned.items():
        tensors[f"learned.{k}"] = v.detach().float().cpu().contiguous()
    classes = list(references or {})
    for i, name in enumerate(classes):
        for k, v in references[name].items():
            tensors[f"reference.{i}.{k}"] = v.detach().cpu().contiguous()
    bad = non_finite(tensors)
    if bad:
        raise InvalidValueError(
            f"cannot save '{shorten(str(path), 120)}': tensor(s) {_quote(bad[:3])} hold NaN or infinite values "
            "(a diverged training run? lower the learning rate); a detector with them would score NaN"
        )
    meta = {
        "format": FORMAT,
        "clipad_version": __version__,
        "method": method,
        "backbone": backbone,
        "pretrained": json.dumps(pretrained),
        "seed": str(int(seed)),
        "image_size": str(int(image_size)),
        "precision": precision,
        "options": json.dumps(dict(options)),
        "reference_classes": json.dumps(classes),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    try:
        decode_header(meta, tensors)
    except _Problem as p:
        raise InvalidValueError(f"cannot save '{shorten(str(path), 120)}': {p.where} {p.what}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, path, meta)


# --------------------------------------------------------------------------- reading


def checkpoint_error(path: str | Path, problem: str, fix: str = FIX) -> CheckpointError:
    """``checkpoint 'PATH' <problem>; <fix>`` (``PATH: <problem>`` unless the problem starts with
    a verb), in at most :data:`MAX_ERROR` characters: the path and the problem are shortened to fit."""
    sep = " " if problem.startswith(("is ", "has ", "holds ", "looks ")) else ": "
    head = f"checkpoint '{shorten(str(path), 160)}'{sep}"
    room = MAX_ERROR - len(head) - len(fix) - 2
    return CheckpointError(f"{head}{shorten(problem, room)}; {fix}")


def read_header(path: str | Path, *, method: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensor entries) of a ``.safetensors`` file, read without its tensors.

    The 8-byte header length is checked against :data:`MAX_HEADER_BYTES` and the file size before
    the header is read; an official PyTorch checkpoint (a zip or a pickle) is never unpickled:
    the error says to convert it (``method`` names the ``--from`` choice in that message).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint '{shorten(str(path), 200)}' does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(9)
        n = int.from_bytes(start[:8], "little") if len(start) == 9 else -1
        # safetensors: the 8-byte length, then the JSON header; torch.save writes a zip, older
        # PyTorch a bare pickle (protocol 2..5)
        looks_safetensors = 2 <= n <= size - 8 and start[8:9] == b"{"
        pickled = start[:4] == b"PK\x03\x04" or (start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        if pickled and not looks_safetensors:
            raise checkpoint_error(path, _OFFICIAL.format(method=method or "METHOD", path=shorten(str(path), 80)),
                                   "clipad convert --help lists the methods it converts")
        if not looks_safetensors or n > MAX_HEADER_BYTES:
            why = (f"its first 8 bytes give a header of {n} bytes, the file has {size}, at most {MAX_HEADER_BYTES} "
                   "is read" if n >= 0 else f"it has {size} bytes")
            raise checkpoint_error(path, f"is not a .safetensors file ({why})",
                                   "give a clipad .safetensors (det.save, clipad train or clipad convert)")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise checkpoint_error(path, f"has a safetensors header that is not valid JSON ({shorten(str(exc), 80)})") from None
    if not isinstance(header, dict):
        raise checkpoint_error(path, f"has a safetensors header that is {_json_kind(header)}, not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise checkpoint_error(path, f"has '__metadata__' that is {_json_kind(meta)}, not a JSON object")
    return meta, header


def read_checkpoint(path: str | Path, *, method: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header with JSON entries decoded, tensors) of a clipad checkpoint.

    The header is checked against :data:`HEADER` before any tensor is read, and floating-point
    tensors must be finite.

    Raises:
        MissingFileError: no such file.
        CheckpointError: anything else wrong (see the module docstring); ``method`` only names the
            method in the advice given for an official checkpoint.
    """
    from safetensors import safe_open

    path = Path(path)
    raw, entries = read_header(path, method=method)
    if raw.get("format") != FORMAT:
        raise checkpoint_error(path, "is not a clipad checkpoint (its header has no 'format: clipad')",
                               f"an official checkpoint must be converted first: clipad convert --from "
                               f"{method or 'METHOD'} IN OUT.safetensors")
    try:
        meta = decode_header(raw, entries)
    except _Problem as p:
        raise checkpoint_error(path, f"{p.where} {p.what}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a bad checkpoint
        raise checkpoint_error(path, f"is not a readable .safetensors file ({shorten(str(exc), 120)})") from exc
    bad = non_finite(tensors)
    if bad:
        raise checkpoint_error(path, f"tensor(s) {_quote(bad[:3])} hold NaN or infinite values (saved from a training "
                                     "run that diverged?), which would make every score NaN",
                               "retrain with a lower learning rate, or use an earlier epoch's checkpoint")
    return meta, tensors


def split_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """-> (learned state, {class_name: reference memory}) of what :func:`read_checkpoint` returned."""
    learned = {k[len("learned."):]: v for k, v in tensors.items() if k.startswith("learned.")}
    refs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("reference."):
            _, idx, name = k.split(".", 2)
            refs.setdefault(meta["reference_classes"][int(idx)], {})[name] = v
    return learned, refs


def read_learned_weights(path: str | Path, method: str) -> dict[str, torch.Tensor]:
    """The learned tensors of a clipad checkpoint made for ``method`` (a saved detector, a
    training checkpoint or a converted official checkpoint)."""
    meta, tensors = read_checkpoint(path, method=method)
    if meta["method"] != method:
        raise checkpoint_error(path, f"holds weights of method {_quote(meta['method'])}, not '{method}'",
                               f"give a checkpoint of '{method}', or use method '{shorten(meta['method'], 64)}'")
    learned, _ = split_tensors(meta, tensors)
    if not learned:
        raise checkpoint_error(path, "holds no learned weights",
                               f"give a checkpoint written by clipad train or clipad convert for '{method}'")
    return learned
