"""The method registry: ``@register_method("name")`` on a Detector subclass makes it creatable."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnknownNameError

if TYPE_CHECKING:
    from .base import Detector

_METHODS: dict[str, type[Detector]] = {}


def register_method(name: str):
    """Class decorator registering a :class:`~clipad.methods.base.Detector` under ``name``."""

    def deco(cls: type[Detector]) -> type[Detector]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
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
