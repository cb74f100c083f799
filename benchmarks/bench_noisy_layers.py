"""NAYER's noisy layers: fused re-initialisation and batched forward+backward against the upstream
per-layer loops. See fastsynth/bench/noisy_layers.py."""
from fastsynth.bench.noisy_layers import main

if __name__ == "__main__":
    main()
