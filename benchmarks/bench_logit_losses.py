"""Fused logit losses vs the upstream eager formulation and torch.compile of it.

    python benchmarks/bench_logit_losses.py [--quick] [--device cpu|cuda] [--csv PATH]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastsynth.bench.logit_losses import main  # noqa: E402

if __name__ == "__main__":
    main()
