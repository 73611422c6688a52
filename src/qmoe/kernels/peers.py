"""Small Triton kernels the peer backends' adapters need around the peers' own GEMMs (one launch
each, no host sync): the expert bitmatrix triton_kernels' routing takes, the padded row count and
the weighted top-k sum humming's sequence needs.

    pack_bitmatrix(topk_ids, bits)          bits [M, ceil(E/32)] uint32 of the chosen experts
    unpack_bitmatrix(bits, E)               its inverse view, bool [M, E]
    align(topk_ids, E, block_m)             vLLM's moe_align_block_size arrays from group_tokens
    weighted_sum(y, ids, w, E, out, shared) out[t] = sum_j w[t, j] y[t k + j] over valid slots
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# --- the bitmatrix of chosen experts (triton_kernels release/3.5.x routing input) -----------------
@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_bitmatrix_kernel(ids_ptr, bits_ptr, n_rows, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                           N_WORDS: tl.constexpr, BLOCK_M: tl.constexpr):
    # one program packs BLOCK_M tokens: reads their k ids (2 bytes each), writes N_WORDS words
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.arange(0, K_POW2)
    in_rows = rows < n_rows
    ids = tl.load(ids_ptr + rows[:, None] * TOP_K + slots[None, :],
                  mask=in_rows[:, None] & (slots < TOP_K)[None, :], other=-1).to(tl.int32)
    valid = ids >= 0  # -1: no expert on this rank, sets no bit
    safe = tl.where(valid, ids, 0)
    bit = tl.full([BLOCK_M, K_POW2], 1, tl.uint32) << (safe % 32).to(tl.uint32)
    none = tl.zeros([BLOCK_M, K_POW2], tl.uint32)
    for w in tl.static_range(N_WORDS):
        word = tl.reduce(tl.where(valid & (safe // 32 == w), bit, none), 1, _bit_or)
        tl.store(bits_ptr + rows * N_WORDS + w, word, mask=in_rows)


PACK_BLOCK_M = 128


def pack_bitmatrix(topk_ids: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Set bit e % 32 of word e // 32 in row m for every expert e chosen by token m.

    topk_ids: [M, k] int16 / int32 contiguous (-1 = no expert: no bit);
    bits: [M, ceil(E/32)] uint32 (every word written). Returns bits.
    """
    M, k = topk_ids.shape
    _pack_bitmatrix_kernel[(triton.cdiv(M, PACK_BLOCK_M),)](
        topk_ids, bits, M, TOP_K=k, K_POW2=triton.next_power_of_2(k), N_WORDS=bits.shape[1],
        BLOCK_M=PACK_BLOCK_M)
    return bits


def unpack_bitmatrix(bits: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Inverse view of `pack_bitmatrix`: [M, W] uint32 -> bool [M, num_experts] (expert chosen)."""
    words = bits.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, device=bits.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(bits.shape[0], -1)[:, :num_experts]



# --- humming's routing arrays and the weighted sum ------------------------------------------------
def align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """vLLM's moe_align_block_size output, from qmoe's group_tokens (no host sync).

    topk_ids: [M, k] int32 contiguous (-1 and ids outside [0, E) are dropped).
    Returns (sorted_ids [NB * block_m] int32: row t * k + j of each slot, grouped by expert, each
    expert padded to a multiple of block_m with -1; expert_ids [NB] int32: the expert of each
    block (-1 past the last); num_tokens_padded [1] int32: block_m x the number of real blocks).
    humming reads only the first num_tokens_padded / block_m blocks and treats sorted ids as
    uint32: a padding -1 is past every row, so it is neither read nor written, as vLLM's
    padding value M * k is.
    """
    from .moe import group_tokens

    grp = group_tokens(topk_ids, num_experts, block_m)
    ntp = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    _padded_rows_kernel[(1,)](grp.block_expert, ntp, grp.num_blocks, BM=block_m, CH=1024, num_warps=4)
    return grp.sorted_slots, grp.block_expert, ntp


def weighted_sum(y: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                 out: torch.Tensor, shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum over slots j with 0 <= id < E of w[t, j] * y[t * k + j] (+ shared_output[t]),
    in fp32, fixed order, written in out's dtype (vLLM's moe_fused_mul_sum, every row written).

    y: [M * k, H] bf16 (rows of invalid slots are never read: they hold garbage);
    topk_ids: [M, k] int32 contiguous; topk_weights: [M, k] float; out: [M, H];
    shared_output: [M, H] or None.
    """
    M, H = out.shape
    k = topk_ids.shape[1]
    w = topk_weights.float().contiguous()
    shared = shared_output.contiguous() if shared_output is not None else None
    dst = out if out.is_contiguous() else torch.empty(M, H, dtype=out.dtype, device=out.device)
    BH = min(1024, triton.next_power_of_2(H))
    _weighted_sum_kernel[(M, triton.cdiv(H, BH))](
        y, topk_ids, w, shared if shared is not None else dst, dst, H, num_experts,
        TOP_K=k, HAS_SHARED=shared is not None, BH=BH, num_warps=4)
    if dst is not out:
        out.copy_(dst)
    return out


# Two small Triton kernels (one launch each): the padded row count humming's scheduler reads, and
# the combine. Defined at import (after TRITON_INTERPRET is read: tests on the CPU interpret them).
@triton.jit
def _padded_rows_kernel(block_expert_ptr, out_ptr, NB, BM: tl.constexpr, CH: tl.constexpr):
    """out[0] = BM x the number of blocks with an expert (real blocks come first)."""
    n = tl.zeros((CH,), dtype=tl.int32)
    for b0 in range(0, NB, CH):
        rb = b0 + tl.arange(0, CH)
        e = tl.load(block_expert_ptr + rb, mask=rb < NB, other=-1)
        n += (e >= 0).to(tl.int32)
    tl.store(out_ptr, tl.sum(n, axis=0) * BM)


@triton.jit
def _weighted_sum_kernel(y_ptr, ids_ptr, w_ptr, shared_ptr, out_ptr, H, E,
                         TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, BH: tl.constexpr):
    """One program per (token, BH columns): reads the bf16 rows of the token's valid slots only."""
    t = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = rh < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j + tl.zeros_like(rh))  # the slot's expert, per column
        use = hm & (e >= 0) & (e < E)
        wj = tl.load(w_ptr + t * TOP_K + j)
        yj = tl.load(y_ptr + (t * TOP_K + j) * H + rh, mask=use, other=0.0)
        acc += tl.where(use, yj.to(tl.float32) * wj, 0.0)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t * H + rh, mask=hm, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + rh, acc.to(out_ptr.dtype.element_ty), mask=hm)


__all__ = ["align", "pack_bitmatrix", "unpack_bitmatrix", "weighted_sum"]
