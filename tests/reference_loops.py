"""The eager reference loops live in the package (fastsynth/bench/reference_loops.py: the
benchmarks time the same loops); test modules may import them by this name."""
from fastsynth.bench.reference_loops import *  # noqa: F401,F403
