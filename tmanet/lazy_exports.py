"""Package attributes imported on first access, so importing a package stays cheap."""
from __future__ import annotations

import importlib


def lazy_getattr(package: str, names: dict, namespace: dict):
    """A module ``__getattr__`` resolving ``names[attr]`` (a submodule of ``package``) on first access and
    caching the value in the package's ``namespace``."""
    def __getattr__(name):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
