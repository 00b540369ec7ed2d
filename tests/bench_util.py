"""Shared by the tests of the benchmark scripts: a script under benchmarks/ loaded as a
module (benchmarks/ is not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str, module_name: str, on_path: bool = False):
    """benchmarks/<filename> executed as a fresh module ``module_name``; ``on_path`` puts
    benchmarks/ first on sys.path so that the script's own imports (bench_common, ...) resolve."""
    if on_path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / filename)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
