"""Load controlnet_aux's reference modules by file path (its package __init__ imports torchvision)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def load_aux_module(relative: str):
    """Import `controlnet_aux/<relative>` (e.g. "canny/__init__.py") without running the package __init__."""
    spec = importlib.machinery.PathFinder.find_spec("controlnet_aux")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("controlnet_aux is not installed (pip install --no-deps controlnet-aux==0.0.10)")
    root = Path(spec.submodule_search_locations[0])
    if not getattr(sys.modules.get("controlnet_aux"), "_loaded_by_file", False):
        package = types.ModuleType("controlnet_aux")
        package.__path__ = [str(root)]
        package._loaded_by_file = True
        sys.modules["controlnet_aux"] = package
    parts = relative.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    module_name = ".".join(["controlnet_aux", *parts])
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = root / relative
    module_spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)] if path.name == "__init__.py" else None
    )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    return module
