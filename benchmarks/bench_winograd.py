"""Frozen-weight 3x3 convolution, forward + input gradient: oneDNN (NCHW, channels_last,
torch.compile) against fastsynth's Winograd F(2x2, 3x3). See fastsynth/bench/winograd.py."""
from fastsynth.bench.winograd import main

if __name__ == "__main__":
    main()
