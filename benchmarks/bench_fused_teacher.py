"""Teacher forward+backward with the BN-statistics loss: plain, upstream hooks, separate
statistics, fused teacher. See fastsynth/bench/fused_teacher.py."""
from fastsynth.bench.fused_teacher import main

if __name__ == "__main__":
    main()
