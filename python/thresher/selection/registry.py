"""Name -> class tables for the offline scorers and the online selectors.

A class registers itself with ``@SCORERS.register("name")`` (or ``@ONLINE.register``); the
built-in ones are listed here by the submodule that defines them, which is imported on the
first lookup. So ``base.py`` and ``online.py`` never import the methods built on them (no
import circle), and a user's own class registers the same way.
"""
from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["Registry", "SCORERS", "ONLINE"]


class Registry:
    """Classes by name. ``attr``: the class attribute that is set to its registered name."""

    def __init__(self, kind: str, attr: str, builtin: dict[str, str]):
        self.kind, self.attr = kind, attr
        self._builtin = dict(builtin)  # name -> submodule of thresher.selection
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty str, got {name!r}")

        def deco(cls: type) -> type:
            old = self._classes.get(name)
            if old is not None and old is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {old.__name__}")
            self._classes[name] = cls
            setattr(cls, self.attr, name)
            return cls

        return deco

    def names(self) -> list[str]:
        """Built-in names first (in their order), then the ones registered since."""
        return list(self._builtin) + [n for n in self._classes if n not in self._builtin]

    def get(self, name: str, arg: str) -> type:
        """The class registered as ``name``; a ValueError names ``arg`` and the choices."""
        if not isinstance(name, str) or name not in self.names():
            raise ValueError(f"{arg} must be one of {', '.join(self.names())}, got {name!r}")
        if name not in self._classes:
            importlib.import_module(f"thresher.selection.{self._builtin[name]}")
        return self._classes[name]


SCORERS = Registry("scorer", "method", {
    "bliss": "bliss", "color": "baselines", "excess": "baselines", "loss": "baselines",
    "miniplm": "baselines", "qurating": "baselines", "random": "baselines"})
ONLINE = Registry("online selector", "name", {
    "blade": "blade", "rho": "online", "rho1": "online", "random": "online", "highloss": "online"})
