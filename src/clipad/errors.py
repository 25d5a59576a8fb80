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


class ClipadError(Exception):
    """Base class of every error clipad raises on purpose."""


class WeightsNotFound(ClipadError):
    """Pretrained weights could not be found locally nor downloaded."""


class UnknownNameError(ClipadError, ValueError):
    """A method, backbone or option value that is not registered; the message lists valid names."""


class InvalidValueError(ClipadError, ValueError):
    """An argument or option whose value, shape or range is wrong; the message says which and what fits."""


class InvalidTypeError(ClipadError, TypeError):
    """An argument of the wrong type; the message names it and the type expected."""


class NumericalError(ClipadError, FloatingPointError):
    """A computation overflowed or underflowed; the message says which option avoids it."""


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
