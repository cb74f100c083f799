"""fastsynth's fused ops. Each op module holds its Python API, validation, backend dispatch,
fake kernels and autograd registration; kernels live in csrc/ (C++/CUDA) and kernels/ (Triton)."""
