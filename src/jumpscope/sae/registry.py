"""Architectures registered by name: the only place that maps a name to a class."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .base import SAE, SAEConfig

_REGISTRY: dict[str, type[SAE]] = {}

SAEClass = TypeVar("SAEClass", bound=type[SAE])


def register(name: str) -> Callable[[SAEClass], SAEClass]:
    """Class decorator: ``@register("jumprelu")`` makes the architecture loadable by name."""

    def decorate(cls: SAEClass) -> SAEClass:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.config_class.architecture = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def architectures() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type[SAE]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown SAE architecture {name!r}; known: {', '.join(architectures())}") from None


def config_class(name: str) -> type[SAEConfig]:
    return get_class(name).config_class


def make_config(name: str, **fields: Any) -> SAEConfig:
    """Build the config of architecture ``name`` from keyword fields."""
    return config_class(name).from_dict(fields)


def build(cfg_or_name: SAEConfig | str, **fields: Any) -> SAE:
    """An SAE from a config object, or from an architecture name and config fields."""
    cfg = make_config(cfg_or_name, **fields) if isinstance(cfg_or_name, str) else cfg_or_name
    if fields and not isinstance(cfg_or_name, str):
        raise TypeError("pass either a config or a name with fields, not both")
    return get_class(cfg.architecture)(cfg)
