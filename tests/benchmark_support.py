"""The scripts in ``benchmarks/`` imported as modules, so tests can call their functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(script: str) -> ModuleType:
    """``benchmarks/<script>.py`` as a module, imported once (its own helpers found beside it, as when run)."""
    name = f"bloodcell_benchmark_{script}"
    if name not in sys.modules:
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: a dataclass in it looks its module up there
        spec.loader.exec_module(module)
    return sys.modules[name]
