"""Benchmark of the BatchNorm-statistics loss (see fastsynth/bench/bn_stat_loss.py)."""
from fastsynth.bench.bn_stat_loss import main

if __name__ == "__main__":
    main()
