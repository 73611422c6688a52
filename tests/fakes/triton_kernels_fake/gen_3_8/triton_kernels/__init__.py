"""Fake triton_kernels, 3.8+ API (see triton_kernels_fake)."""
