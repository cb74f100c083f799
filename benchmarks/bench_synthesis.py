"""Synthesis inner step: fastsynth vs the eager upstream loop (see fastsynth/bench/synthesis.py)."""
from fastsynth.bench.synthesis import main

if __name__ == "__main__":
    main()
