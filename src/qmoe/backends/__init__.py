"""Backends behind one protocol (`base`), found by name through `registry`.

    reference           PyTorch on any device: the ground truth (not capturable)
    triton              qmoe's own Triton kernels (mxfp4, nvfp4, int4)
    triton_kernels      OpenAI's triton_kernels matmul_ogs (mxfp4, SM90), as vLLM runs it
    marlin              vLLM's Marlin MoE kernel (mxfp4, nvfp4, int4), as vLLM runs it
    humming             humming-kernels W4A16 MoE (mxfp4, nvfp4, int4), as vLLM runs it
    flashinfer_*        FlashInfer's fused MoE kernels (flashinfer/)

External libraries are imported only when a backend is asked about, never when qmoe is imported.
"""

from __future__ import annotations

from ..support import Support
from .base import Backend, Prepared, cuda_capability
from .registry import BACKEND_NAMES, get_backend

__all__ = ["BACKEND_NAMES", "Backend", "Prepared", "Support", "cuda_capability", "get_backend"]
