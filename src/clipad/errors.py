"""Exceptions raised by clipad. Each names the thing at fault and, where there is one, the fix."""

from __future__ import annotations


class ClipadError(Exception):
    """Base class of every error clipad raises on purpose."""


class WeightsNotFound(ClipadError):
    """Pretrained weights could not be found locally nor downloaded."""


class UnknownNameError(ClipadError, ValueError):
    """A method, backbone or option value that is not registered; the message lists valid names."""


class ImageReadError(ClipadError):
    """An input image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image '{self.path}': {reason}")
