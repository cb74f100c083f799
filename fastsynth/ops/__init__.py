"""fastsynth's fused ops. Each op module holds its Python API, validation, backend dispatch,
fake kernels and autograd registration; kernels live in csrc/ (C++/CUDA) and kernels/ (Triton)."""
from .reinit import advance_seed_, make_seed, reinit_  # noqa: E402,F401  (noisy layers)
