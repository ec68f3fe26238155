"""Importing user code by path: custom reward functions and policy-loss plugins.

Why one place: user code must be importable in every process that needs it (reward pool
processes, every actor rank), from a path given in the config, with an error that names the
config key when the file or module is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType


def import_file(path: str | Path, key: str) -> ModuleType:
    """Import a Python file once per process (cached under a name derived from its path)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: file {str(path)!r} does not exist")
    name = "fipo_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{key}: cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_plugins(specs: Iterable[str], key: str) -> list[ModuleType]:
    """Import each spec: a `.py` file path or a dotted module name (e.g. `my_pkg.losses`)."""
    modules = []
    for spec in specs:
        if spec.endswith(".py") or "/" in spec:
            modules.append(import_file(spec, key))
            continue
        try:
            modules.append(importlib.import_module(spec))
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"{key}: cannot import module {spec!r} ({err}); give a .py file path or a "
                "module on PYTHONPATH"
            ) from err
    return modules
