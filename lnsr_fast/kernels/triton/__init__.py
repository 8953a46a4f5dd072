"""Triton kernels of the LNSR step (docs/design.md §1): noise sampling and the fused layer-wise stability term.

One op per module (gaussian_noise, in_manifold_noise, layerwise_stability), each with its @triton.jit
kernels and launchers; kernels/ops.py imports them on demand, so `import lnsr_fast` never imports triton.
"""
