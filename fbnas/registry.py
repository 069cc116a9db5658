"""Shared pieces of the named registries of classes (latency penalties, loss terms): the decorator that registers
a class under its name, and the default checkpoint state of a component that keeps none."""
from __future__ import annotations

from typing import Callable


def registrar(table: dict[str, type]) -> Callable[[str], Callable[[type], type]]:
    """`@registrar(TABLE)(name)` puts the class in TABLE under `name` and sets its `name` attribute."""
    def register(name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            table[name] = cls
            cls.name = name
            return cls
        return deco
    return register


class Stateless:
    """The checkpoint state of a component without any: an empty dict, nothing to load."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
