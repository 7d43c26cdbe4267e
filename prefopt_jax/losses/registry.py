"""Objectives by name: `register(name)` decorates, `get(name)` looks up.

Names are the registry names of /work/shared/ALGORITHMS.md. Selection happens by name in configs,
never through `if name == ...` chains.
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable] = {}


class UnknownLossError(KeyError):
    """An objective name that is not registered; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering `fn` under `name`; registering a name twice is an error."""
    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = fn
        return fn

    return deco


def get(name: str) -> Callable:
    """The objective registered as `name`; unknown names raise UnknownLossError listing all."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownLossError(f"unknown loss {name!r}; known losses: {known}") from None


def names() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)
