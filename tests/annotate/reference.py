"""Load controlnet_aux's reference modules by file path.

Its package `__init__` (and some subpackage `__init__`s) import detectors that need torchvision, which does
not import beside the CPU torch here. Packages along the way are registered as empty stubs, so only the
requested file and what it imports run. `einops` (not installed here) gets a stub that knows the one
pattern the HED and PiDiNet detectors use.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest

PACKAGE = "controlnet_aux"


def aux_root() -> Path:
    spec = importlib.machinery.PathFinder.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("controlnet_aux is not installed (pip install --no-deps controlnet-aux==0.0.10)")
    return Path(spec.submodule_search_locations[0])


def stub_package(name: str, path: Path) -> None:
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, "_reference_stub", False):
        return
    if existing is not None and getattr(existing, "__file__", None) and Path(existing.__file__).parent == path:
        return
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    package._reference_stub = True
    sys.modules[name] = package


def install_einops_stub() -> None:
    if "einops" in sys.modules or importlib.util.find_spec("einops") is not None:
        return
    einops = types.ModuleType("einops")

    def rearrange(x, pattern: str):
        if pattern.replace(" ", "") != "hwc->1chw":
            raise NotImplementedError(f"einops stub: pattern {pattern!r}")
        return x.permute(2, 0, 1)[None]

    einops.rearrange = rearrange
    sys.modules["einops"] = einops


def load_aux_module(relative: str):
    """Import `controlnet_aux/<relative>` (e.g. "canny/__init__.py") without the package __init__s."""
    root = aux_root()
    install_einops_stub()
    parts = relative.removesuffix(".py").split("/")
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    stub_package(PACKAGE, root)
    for depth in range(1, len(parts) if not is_package else len(parts)):
        stub_package(".".join([PACKAGE, *parts[:depth]]), root.joinpath(*parts[:depth]))
    module_name = ".".join([PACKAGE, *parts])
    existing = sys.modules.get(module_name)
    if existing is not None and not getattr(existing, "_reference_stub", False):
        return existing
    path = root / relative
    spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)] if is_package else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
