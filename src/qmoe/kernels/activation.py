"""The SwiGLU of qmoe.spec.SwiGLU in Triton: the formula once, for every kernel that applies it.

    swiglu(g, u, alpha, beta, limit, HAS_LIMIT)      @triton.jit, fp32 tiles in and out
    swiglu_rows(h, out, alpha, beta, limit)          one launch over h [R, 2I] -> out [R, I]

(u + beta) * g * sigmoid(alpha * g) with g = min(gate, limit) and u = clamp(up, -limit, limit)
when a limit is given, NaN kept through the clamps as torch.clamp keeps it (Triton's minimum and
maximum drop NaN by default): the semantics of qmoe.backends.reference.swiglu. The fused GEMM1
of kernels/_moe_kernels.py applies it in its epilogue; `swiglu_rows` serves adapters whose GEMM
leaves gate and up in memory (the Marlin backend), in one launch instead of a chain of PyTorch
elementwise kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def swiglu(g, u, alpha, beta, limit, HAS_LIMIT: tl.constexpr):
    """fp32 gate and up tiles -> the activation (fp32); limit is ignored unless HAS_LIMIT."""
    if HAS_LIMIT:
        g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                       propagate_nan=tl.PropagateNan.ALL)
    return (u + beta) * g * tl.sigmoid(alpha * g)


@triton.jit
def _swiglu_rows_kernel(h_ptr, out_ptr, I, stride_h, stride_out, alpha, beta, limit,
                        HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(h_ptr + row * stride_h + cols, mask=mask).to(tl.float32)
    u = tl.load(h_ptr + row * stride_h + I + cols, mask=mask).to(tl.float32)
    a = swiglu(g, u, alpha, beta, limit, HAS_LIMIT)
    tl.store(out_ptr + row * stride_out + cols, a.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu_rows(h: torch.Tensor, out: torch.Tensor, alpha: float, beta: float, limit: float | None) -> torch.Tensor:
    """out[r] = SwiGLU(gate = h[r, :I], up = h[r, I:]), computed in fp32, rounded to out's dtype.

    h: [R, 2I] float (bf16 / fp16 / fp32), rows contiguous; out: [R, I] float, rows contiguous,
    on h's device; limit None: no clamp. Returns out. One launch, no host sync."""
    R, two_i = h.shape
    I = two_i // 2
    if two_i != 2 * I or tuple(out.shape) != (R, I):
        raise ValueError(f"h, out: expected [R, 2I] and [R, I], got {list(h.shape)} and {list(out.shape)}")
    if h.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("h, out: expected contiguous rows")
    if R and I:
        block = min(1024, triton.next_power_of_2(I))
        _swiglu_rows_kernel[(R, triton.cdiv(I, block))](
            h, out, I, h.stride(0), out.stride(0), float(alpha), float(beta),
            float(limit) if limit is not None else 0.0, HAS_LIMIT=limit is not None, BLOCK=block)
    return out


__all__ = ["swiglu", "swiglu_rows"]
