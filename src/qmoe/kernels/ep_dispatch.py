"""Expert-parallel dispatch into fixed buffers: one Triton launch writes every row a rank sends.

    fill_send_rows(route, x, topk_ids, topk_weights, send_x, send_ids, send_w)

The send buffers hold W chunks of T rows (T = max_tokens); row t of chunk r is token t as rank r
will compute it: x[t], and per slot j the id that names expert topk_ids[t, j] at rank r (its
local id there) or -1 (the slot's expert lives elsewhere). route[r, c] is that id for the
clamped id c = clamp(id, -2, E), wrapped like Python indexing (column E: an id outside
[-1, E); column E + 1: id -1). Rows t >= M of every chunk get ids -1 (nothing to compute), and
their x and weights are left as they are.

(A group of one sends nothing: qmoe.parallel.ep hands its tokens to the local plan as they are.)

One program per row; no host synchronization, sizes depend on M, T and the shapes only
(CUDA-graph capturable). `fill_send_rows_torch` is the same function in PyTorch operations (the
CPU path, and the reference the tests compare the kernel with).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _send_rows_kernel(route_ptr, x_ptr, ids_ptr, w_ptr, sx_ptr, sids_ptr, sw_ptr, M, T, H, E,
                      stride_x, stride_sx, K: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    r = row // T
    t = row - r * T
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    if t < M:
        ids = tl.load(ids_ptr + t * K + kk, mask=kmask, other=-1)
        c = tl.minimum(tl.maximum(ids, -2), E)
        c = tl.where(c < 0, c + E + 2, c)
        local = tl.load(route_ptr + r * (E + 2) + c, mask=kmask, other=-1)
        tl.store(sids_ptr + row * K + kk, local, mask=kmask)
        w = tl.load(w_ptr + t * K + kk, mask=kmask, other=0.0)
        tl.store(sw_ptr + row * K + kk, w, mask=kmask)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            v = tl.load(x_ptr + t.to(tl.int64) * stride_x + hh, mask=hh < H)
            tl.store(sx_ptr + row.to(tl.int64) * stride_sx + hh, v, mask=hh < H)
    else:
        tl.store(sids_ptr + row * K + kk, tl.full([BLOCK_K], -1, tl.int32), mask=kmask)


def fill_send_rows(route: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   send_x: torch.Tensor, send_ids: torch.Tensor, send_w: torch.Tensor) -> None:
    """Write the send rows (see the module docstring) in one launch.

    route: [W, E + 2] int32; x: [M, H] (any float dtype), rows contiguous; topk_ids: [M, k]
    int32 contiguous; topk_weights: [M, k] fp32 contiguous; send_x: [W * T, H] of x's dtype;
    send_ids: [W * T, k] int32; send_w: [W * T, k] fp32 (all contiguous, on x's device)."""
    W, E2 = route.shape
    M, k = topk_ids.shape
    T = send_ids.shape[0] // W
    H = x.shape[1]
    rows = W * T
    if rows == 0:
        return
    _send_rows_kernel[(rows,)](route, x, topk_ids, topk_weights, send_x, send_ids, send_w, M, T, H, E2 - 2,
                               x.stride(0), send_x.stride(0), K=k, BLOCK_K=triton.next_power_of_2(k),
                               BLOCK_H=min(1024, triton.next_power_of_2(max(H, 16))))


def fill_send_rows_torch(route, x, topk_ids, topk_weights, send_x, send_ids, send_w) -> None:
    """fill_send_rows in PyTorch operations (same arguments, same result)."""
    W, E2 = route.shape
    M, k = topk_ids.shape
    T = send_ids.shape[0] // W
    c = topk_ids.clamp(-2, E2 - 2).to(torch.int64)
    ids = send_ids.view(W, T, k)
    ids[:, :M] = route[:, c]
    ids[:, M:] = -1
    send_w.view(W, T, k)[:, :M] = topk_weights
    send_x.view(W, T, x.shape[1])[:, :M] = x


__all__ = ["fill_send_rows", "fill_send_rows_torch"]
