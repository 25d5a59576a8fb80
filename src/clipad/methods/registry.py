"""The method registry: ``@register_method("name")`` on a Detector subclass makes it creatable;
``converter=`` also registers the function that imports the method's official checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..checkpoint import Converted
from ..errors import InvalidValueError, UnknownNameError
from .base import Detector, LearnedDetector, LearnedOptions, Options

Converter = Callable[[Any], Converted]  # the loaded official checkpoint object -> Converted

_METHODS: dict[str, type[Detector]] = {}
_CONVERTERS: dict[str, Converter] = {}


def register_method(name: str, *, converter: Converter | None = None):
    """Class decorator registering a :class:`~clipad.methods.base.Detector` under ``name``.

    ``converter``: turns an official checkpoint object (``torch.load`` of the official ``.pth``)
    into :class:`~clipad.checkpoint.Converted`; ``clipad convert --from NAME`` uses it.
    """

    def deco(cls: type[Detector]) -> type[Detector]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise InvalidValueError(f"method '{name}' is already registered by {_METHODS[name].__qualname__}; "
                                    "register the new class under another name")
        opts = cls.Options
        if not (isinstance(opts, type) and issubclass(opts, Options) and dataclasses.is_dataclass(opts)):
            raise InvalidValueError(f"{cls.__qualname__}.Options must be a dataclass subclassing clipad.methods.base.Options")
        if issubclass(cls, LearnedDetector) and not issubclass(opts, LearnedOptions):
            raise InvalidValueError(f"{cls.__qualname__} is a LearnedDetector: its Options must subclass LearnedOptions")
        cls.name = name
        _METHODS[name] = cls
        if converter is not None:
            _CONVERTERS[name] = converter
        return cls

    return deco


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type[Detector]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownNameError(f"unknown method '{name}'. Valid methods: {', '.join(list_methods())}") from None


def learned_methods() -> list[str]:
    """Registered methods with learned tensors (:class:`~clipad.methods.base.LearnedDetector`), sorted:
    what ``clipad train`` trains."""
    return sorted(n for n, cls in _METHODS.items() if issubclass(cls, LearnedDetector))


def converters() -> dict[str, Converter]:
    """Official-checkpoint converters by source name (= the method they produce)."""
    return dict(_CONVERTERS)


def list_converters() -> list[str]:
    """Sources ``clipad convert --from`` accepts, sorted."""
    return sorted(_CONVERTERS)


def get_converter(source: str) -> Converter:
    try:
        return _CONVERTERS[source]
    except KeyError:
        raise UnknownNameError(f"unknown source '{source}'; clipad converts: {', '.join(list_converters())}") from None
