"""Hand-written GPU kernels (Triton and CUDA) and their launchers.

Imports nothing of evalkit: kernels take tensors and return tensors; backends (evalkit.backends) and policies
(evalkit.policies.pi05) choose when to call them. Written here, not taken from a library, because no library
had a kernel for these shapes (M <= 16 GEMMs of the action expert, split-K decode attention).
"""
