"""Exceptions and warnings of clipad. Each names the thing at fault and, where there is one, the fix.

Errors: every error clipad raises on purpose is a :class:`ClipadError`; the ones that stand for a
builtin kind also subclass that builtin (:class:`InvalidValueError` is a ``ValueError``...), so
``except ValueError`` around a clipad call keeps working. The command line turns any
:class:`ClipadError` into one ``clipad: <message>`` line and exit code 2, never a traceback.

Warnings: every warning clipad emits on purpose is a :class:`ClipadWarning` (a ``UserWarning``).
Python code sees ordinary warnings (filter them by category); the command line prints each one
once as ``clipad: warning: <message>`` above its progress bar, and a :class:`SkippedInputWarning`
as ``clipad: <message>``, like the inputs it skips itself.
"""

from __future__ import annotations

#: the longest message a :class:`ClipadError` shows; a longer one is cut in the middle
MAX_MESSAGE = 2000


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    kept = max(0, limit - len(f"...[{len(text)} characters left out]..."))
    marker = f"...[{len(text) - kept} characters left out]..."
    head = kept * 2 // 3
    tail = kept - head
    return text[:head] + marker + (text[-tail:] if tail else "")


def shorten(value: object, limit: int = 200) -> str:
    """``value`` as one line of at most about ``limit`` characters, for messages that quote user data
    (a file's header, a request): a string as is (control characters escaped), anything else as
    its ``repr``; a longer one keeps its start and end around ``...[N characters left out]...``."""
    text = value if isinstance(value, str) else repr(value)
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return _cut(text, limit)


class ClipadError(Exception):
    """Base class of every error clipad raises on purpose. Its message is at most
    :data:`MAX_MESSAGE` characters (a longer one is cut in the middle), so quoted data never floods
    a terminal or a log."""

    def __str__(self) -> str:
        return _cut(super().__str__(), MAX_MESSAGE)

    #: The message as the command line shows it, where its fix is worded in flags
    #: (``--pretrained /path``) rather than Python arguments (``pretrained='/path'``); None: ``str()``.
    cli_message: str | None = None


class WeightsNotFound(ClipadError):
    """Pretrained weights could not be found locally nor downloaded.

    When an open_clip tag is neither cached nor downloadable, ``backbone``, ``tag`` and ``reason``
    (why nothing was downloaded: offline mode set, no network, the download's own error) say what
    was tried, and :attr:`cli_message` gives the fix in command-line flags; for other causes (a
    file that cannot be read) they are None and one message serves both.
    """

    def __init__(
        self, message: str, *, backbone: str | None = None, tag: str | None = None, reason: str | None = None,
        cli_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.backbone, self.tag, self.reason = backbone, tag, reason
        if cli_message is not None:
            self.cli_message = _cut(cli_message, MAX_MESSAGE)


class UnknownNameError(ClipadError, ValueError):
    """A method, backbone or option value that is not registered; the message lists valid names."""


class InvalidValueError(ClipadError, ValueError):
    """An argument or option whose value, shape or range is wrong; the message says which and what fits."""


class InvalidTypeError(ClipadError, TypeError):
    """An argument of the wrong type; the message names it and the type expected."""


class NumericalError(ClipadError, FloatingPointError):
    """A computation overflowed or underflowed; the message says which option avoids it."""


class CheckpointError(ClipadError, ValueError):
    """A checkpoint file that is not a valid clipad checkpoint (unreadable, not safetensors, an
    official file not converted yet, a header that breaks the format's schema, non-finite weights)."""


class MissingFileError(ClipadError, FileNotFoundError):
    """A file that an operation needs (not an input image: see :class:`ImageReadError`) does not exist."""


class NotReadyError(ClipadError, RuntimeError):
    """An object used before the step that prepares it (e.g. a server queue before ``start()``)."""


class ImageReadError(ClipadError):
    """An input image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image '{self.path}': {reason}")


class OutputWriteError(ClipadError, OSError):
    """Some output files could not be written (disk full, no permission); the others were.

    ``problems`` holds one line per file not written (which file and why), ``written`` maps the
    name of each output that was written to its path.
    """

    def __init__(self, problems: list[str], written: dict | None = None) -> None:
        self.problems = list(problems)
        self.written = dict(written or {})
        super().__init__(
            f"{len(self.problems)} output file(s) not written: {'; '.join(self.problems)}; "
            "free space or fix the permissions of the output folder and run again"
        )


class ClipadWarning(UserWarning):
    """Base category of every warning clipad emits on purpose."""


class SkippedInputWarning(ClipadWarning):
    """One input (an image, a mask, a reference) could not be used and was left out; the run goes on
    and counts it as failed (``RunResult.failures``, ``TrainResult.failures``)."""
