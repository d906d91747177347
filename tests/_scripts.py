"""Loading a ``benchmarks/*.py`` script as a module in tests (the scripts are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as module ``ep_kit_bench_<name>``, registered in ``sys.modules``
    (dataclasses in the scripts resolve their annotations through it)."""
    spec = importlib.util.spec_from_file_location(f"ep_kit_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
