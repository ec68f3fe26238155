"""A package's public names, each imported from its module on first use (PEP 562).

Why: ``fipo-train`` validates its config and starts Ray before it imports torch, which it
imports meanwhile in the background (``fipo_trainer.startup.import_in_background``); a
package ``__init__`` that imported its tensor modules eagerly would pull torch into the
first ``from fipo_trainer.<package>.config import ...``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: ``name`` comes from ``package.<where[name]>``."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
