"""Triton kernels of fastsynth, installed as ``fastsynth.kernels``.

One module per op, and addresses.py, the device address vector that the multi-tensor ops
(bn_stat_loss, reinit) share. Importing this package does not import Triton; each op module does, and
fastsynth.ops only imports an op module when the Triton backend is used.
"""
