"""Package exports imported on first use, so that importing a package (the ``thresher``
command's argument parsing imports ``thresher.cli.score``, say) does not pull in
torch before a command actually runs."""
from __future__ import annotations

import sys
from importlib import import_module


def lazy_exports(package: str, names: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: each public name maps to the submodule
    (relative, e.g. ``"base"``) that defines it and is imported from it on first access."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{names[name]}"), name)
        setattr(sys.modules[package], name, value)  # imported once
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
