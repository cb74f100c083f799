"""Triton kernels of fastsynth, installed as ``fastsynth.kernels``.

One module per op. Importing this package does not import Triton; each op module does, and
fastsynth.ops only imports an op module when the Triton backend is used.
"""
