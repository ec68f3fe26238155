"""Import a file under ``scripts/`` as a module (scripts are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py``, registered in ``sys.modules`` under ``name`` (its dataclasses
    and pickled functions look themselves up there)."""
    if str(SCRIPTS) not in sys.path:  # scripts import their siblings, as when run directly
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
