"""`jumpflow bench`: every method, same data, backbone, seed and budget, scored on the same noise in one table."""

from .run import run_bench
from .spec import PRESETS, BenchSpec, get_spec, select_methods

__all__ = ["BenchSpec", "PRESETS", "get_spec", "run_bench", "select_methods"]
