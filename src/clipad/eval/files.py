"""Output files that are never half-written, and file names that can always be written as text.

Two things every command that writes results needs:

- :func:`atomic_write` (and :func:`write_text_atomic`): a file is written beside its final name
  and renamed over it (``os.replace``) only once complete, so a reader, a crash or a full disk
  never leaves a truncated ``metrics.json`` or PNG behind; on failure the temporary file is
  removed and the error propagates, and an older file of that name stays as it was.
- :func:`display_path` / :func:`display_text`: POSIX file names are bytes; Python decodes the
  ones that are not UTF-8 with surrogate escapes (``b'bad\\xff.png'`` -> ``'bad\\udcff.png'``),
  which ``open(..., encoding='utf-8')``, ``json``, a UTF-8 stderr and matplotlib all refuse. These
  turn each such byte into the visible, reversible text ``\\xff`` (``'bad\\\\xff.png'``), the form
  ``bytes.decode('utf-8', 'backslashreplace')`` gives; valid text is returned unchanged.

Lives in :mod:`clipad.eval` because that is the lowest layer holding output writers (metrics,
report, figures) and both the CLI and train/serve sit above it; it imports only the standard
library, so importing it is cheap.

Example:
    >>> display_text("bad\\udcff.png")
    'bad\\\\xff.png'
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(p) as f:
    ...     _ = f.write("complete")
    >>> p.read_text()
    'complete'
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InvalidValueError

__all__ = ["atomic_write", "display_path", "display_text", "write_error_message", "write_text_atomic"]

# Lone surrogates: U+DC80..U+DCFF are undecodable bytes 0x80..0xFF (PEP 383); any other one
# (from a broken string, not from the file system) is shown as its code point.
_SURROGATE = re.compile("[\ud800-\udfff]")

# Temporary names keep the final name for recognisability, cut so name + suffix fits NAME_MAX (255).
_MAX_TMP_STEM_BYTES = 200


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def display_text(text: object) -> str:
    """``str(text)`` with every lone surrogate made visible: ``\\xNN`` for a surrogate-escaped
    byte, ``\\uNNNN`` for any other. The result always encodes as UTF-8."""
    return _SURROGATE.sub(_escape, str(text))


def display_path(path: str | bytes | os.PathLike) -> str:
    """A path as text for CSV, JSON, HTML, figure titles and messages (see the module docstring)."""
    return display_text(os.fsdecode(path))


def _tmp_path(path: Path) -> Path:
    stem = path.name
    if len(os.fsencode(stem)) > _MAX_TMP_STEM_BYTES:
        stem = "clipad"
    return path.with_name(f"{stem}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit rename it to ``path``.

    Args:
        path: the final file; its folder must exist.
        mode: ``"w"`` (text, ``encoding``) or ``"wb"`` (bytes).
        encoding: text encoding (text mode only); UTF-8 by default, whatever the locale.
        newline: as :func:`open` (``""`` for the ``csv`` module).

    Yields:
        The open file object. The temporary file is ``<name>.<random>.tmp`` in the same folder
        (same file system, so the rename is atomic), created with the usual permissions (umask).

    Raises:
        OSError: the file cannot be created, written or renamed; nothing is left behind then,
            and an existing ``path`` is untouched. Any exception raised inside the ``with``
            block likewise removes the temporary file and propagates.
    """
    if mode not in ("w", "wb"):
        raise InvalidValueError(f"atomic_write mode must be 'w' (text) or 'wb' (bytes), got {mode!r}")
    path = Path(path)
    tmp = _tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode == "wb":
            f = open(fd, "wb")
        else:
            f = open(fd, "w", encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` through :func:`atomic_write`; returns ``Path(path)``."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def write_error_message(path: str | os.PathLike, exc: BaseException) -> str:
    """One line saying that ``path`` was not written and why, e.g. ``cannot write 'o/x.png': No
    space left on device``. The OS reason is taken without the temporary file's name, which
    would only confuse."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return f"cannot write '{display_path(path)}': {display_text(reason)}"
