"""A read-only streaming kernel: the memory floor of code that only reads (MoE weights are
only read), measured rather than taken from a datasheet.

    read_sum(buf, partial)   # every byte of buf read once; partial sums written (few bytes)

Each program reads BLOCK contiguous fp32 values per step and loops over its share of the
buffer, so all SMs stream with many loads in flight; the writes (one float per program) are
negligible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 16384
"""fp32 values per program per step (64 KB)."""
WARPS = 16


@triton.jit
def _read_sum_kernel(x_ptr, out_ptr, n, steps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    base = pid.to(tl.int64) * steps * BLOCK
    for i in range(steps):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_sum(buf: torch.Tensor, programs: int) -> torch.Tensor:
    """Sum of buf (fp32, contiguous) in `programs` partial sums: reads every byte once.

    buf: [N] float32 on a CUDA device; returns [programs] float32."""
    n = buf.numel()
    steps = triton.cdiv(n, programs * BLOCK)
    out = torch.empty(programs, dtype=torch.float32, device=buf.device)
    _read_sum_kernel[(programs,)](buf, out, n, steps, BLOCK=BLOCK, num_warps=WARPS)
    return out


__all__ = ["BLOCK", "read_sum"]
