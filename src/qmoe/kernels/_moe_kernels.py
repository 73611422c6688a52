"""Triton bodies of qmoe's MoE kernels (the public entry is kernels/moe.py).

Row strides of the packed weights (KB, bytes) and of their scales (NSC) are kernel
arguments, not computed inside: Triton specializes integer arguments divisible by 16, and
only then can it prove 16-byte aligned rows and issue 16-byte loads (computed strides gave
one-byte loads, 16x the load instructions).

Formats (FMT constexpr): 0 = mxfp4 (E2M1 + E8M0 per 32), 1 = nvfp4 (E2M1 + E4M3 per 16,
fp32 global scale per expert), 2 = int4 (signed int4 + bf16 per 32). Weights are in the
layout of kernels/layout.py: K in chunks of 2G elements; a row's G bytes of a chunk hold
the chunk's first G elements in their low nibbles and the last G in their high nibbles,
so each nibble half is one scale group.

Decoding is the hot spot: at decode batch sizes the kernels are bound by integer ops per
weight, not by bytes. On a GPU (ASM=True) four packed bytes become eight bf16 values with
byte permutes, shifts and 3-input logic ops on 32-bit words and one bf16x2 multiply per
pair (about 3 instructions per weight instead of ~13); the interpreter (ASM=False) runs
the same arithmetic element by element in fp32.
"""

import triton
import triton.language as tl

FMT_MXFP4 = 0
FMT_NVFP4 = 1
FMT_INT4 = 2

_TWO_POW_126 = tl.constexpr(8.507059173023462e37)
_TWO_POW_120 = tl.constexpr(1.329227995784916e36)

# 4 packed bytes ($4) and the two halves' scales ($5, $6 and $7, $8: bf16x2) -> low-nibble values
# ($0, $1) and high-nibble values ($2, $3), each 4 bf16. E2M1 magnitude bits go to the low
# exponent bits and top mantissa bit of a bf16 (value x 2^-126, exact incl. the subnormal
# 0.5), the sign to bit 15; x 2^126 (0x7E80) restores the value, x scale applies the block.
_ASM_E2M1 = tl.constexpr("""
{
.reg .b32 t0, t1, a, b, k;
mov.b32 k, 0x7E807E80;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shl.b32 a, t0, 6;  shl.b32 b, t0, 12; and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $0, a, $5;
shl.b32 a, t1, 6;  shl.b32 b, t1, 12; and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $1, a, $6;
shl.b32 a, t0, 2;  shl.b32 b, t0, 8;  and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $2, a, $7;
shl.b32 a, t1, 2;  shl.b32 b, t1, 8;  and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $3, a, $8;
}
""")

# int4: bf16 0x4300 | u is 128 + u exactly for u < 128; u = code ^ 8 maps -8..7 to 0..15,
# so (0x4300 | (code ^ 8)) - 136 is the signed value; then x scale.
_ASM_INT4 = tl.constexpr("""
{
.reg .b32 t0, t1, a, k;
mov.b32 k, 0x43084308;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
and.b32 a, t0, 0x000F000F; xor.b32 a, a, 0x43084308; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $0, a, $5;
and.b32 a, t1, 0x000F000F; xor.b32 a, a, 0x43084308; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $1, a, $6;
shr.b32 a, t0, 4; and.b32 a, a, 0x000F000F; xor.b32 a, a, 0x43084308; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $2, a, $7;
shr.b32 a, t1, 4; and.b32 a, a, 0x000F000F; xor.b32 a, a, 0x43084308; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $3, a, $8;
}
""")


@triton.jit
def _e2m1_to_f32(c):
    """uint32 codes 0..15 -> fp32: the code's 3 magnitude bits become the low exponent
    bits and top mantissa bit of an fp32 (exact, subnormal 0.5 included), scaled back by 2^126."""
    bits = ((c & 8) << 28) | ((c & 7) << 22)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_126


@triton.jit
def _scale_to_f32(s, FMT: tl.constexpr):
    """Raw scale bytes (uint32 of uint8 / int16 bits) -> fp32 scale."""
    if FMT == 0:  # E8M0: 2^(s-127); 0 -> 2^-127 (subnormal), 255 -> NaN
        bits = (s << 23) | tl.where((s == 0) | (s == 255), 0x400000, 0)
        return bits.to(tl.float32, bitcast=True)
    elif FMT == 1:  # E4M3 (fn): place eeee.mmm in an fp32, rescale by 2^120; 0x7F/0xFF are NaN
        mag = ((s & 0x7F) << 20).to(tl.float32, bitcast=True) * _TWO_POW_120
        v = tl.where((s & 0x80) != 0, -mag, mag)
        return tl.where((s & 0x7F) == 0x7F, float("nan"), v)
    else:  # bf16 bits
        return ((s & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_chunk(w_rows, s_rows, c, nch, BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
                CDT: tl.constexpr, ASM: tl.constexpr):
    """Chunk c (2G elements) of BN rows -> (lo, hi): [BN, G] each in CDT, scales applied;
    zeros for c >= nch (the tail of an unrolled loop).

    w_rows: [BN, 1] pointers to each row's packed bytes; s_rows: [BN, 1] pointers to its scales."""
    ok = (tl.zeros((1, 1), dtype=tl.int32) + c) < nch  # a tensor mask (the interpreter refuses scalars)
    b = tl.load(w_rows + (c * G + tl.arange(0, G))[None, :], mask=ok, other=0)   # [BN, G] uint8
    s_lo = _scale_to_f32(tl.load(s_rows + 2 * c, mask=ok, other=0).to(tl.uint32), FMT)    # [BN, 1]
    s_hi = _scale_to_f32(tl.load(s_rows + 2 * c + 1, mask=ok, other=0).to(tl.uint32), FMT)
    if ASM:
        slo = tl.broadcast_to(s_lo.to(tl.bfloat16), (BN, G))
        shi = tl.broadcast_to(s_hi.to(tl.bfloat16), (BN, G))
        if FMT == 2:
            lo, hi = tl.inline_asm_elementwise(_ASM_INT4, "=r,=r,=r,=r,r,r,r,r,r", [b, slo, shi],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_ASM_E2M1, "=r,=r,=r,=r,r,r,r,r,r", [b, slo, shi],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        return lo, hi
    else:
        b32 = b.to(tl.uint32)
        c_lo = b32 & 0xF
        c_hi = b32 >> 4
        if FMT == 2:
            v_lo = ((c_lo ^ 8).to(tl.int32) - 8).to(tl.float32)
            v_hi = ((c_hi ^ 8).to(tl.int32) - 8).to(tl.float32)
        else:
            v_lo = _e2m1_to_f32(c_lo)
            v_hi = _e2m1_to_f32(c_hi)
        return (v_lo * s_lo).to(CDT), (v_hi * s_hi).to(CDT)


@triton.jit
def _mma(acc, a, w, SWAP: tl.constexpr):
    """acc += a @ w.T; with SWAP the accumulator is transposed ([BN, BM]) so the dequantized
    weight is the MMA's first operand (from registers) and the gathered rows the second."""
    if SWAP:
        return tl.dot(w, tl.trans(a), acc)
    else:
        return tl.dot(a, tl.trans(w), acc)


@triton.jit
def moe_gemm1_kernel(
    x_ptr, stride_xm,                 # [M, H] activations
    w_ptr, s_ptr, gs_ptr, b_ptr,      # w13 [E, 2Ip, Kp/2] u8; scales [E, 2Ip, Kp/G]; gs [E] f32; b13 [E, 2Ip] f32
    inter_ptr,                        # [NB * BM, Ip] bf16 (sorted, padded rows)
    sorted_ptr, block_expert_ptr,     # [NB * BM] i32 slot ids (-1 = padding); [NB] i32 expert (-1 = no block)
    H, Ip, Kp, top_k, n_tiles, KB, NSC,
    alpha, beta, limit,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr,
    U: tl.constexpr,
):
    """GEMM1 + SwiGLU: for one block of BM sorted token slots of one expert and BN intermediate
    columns, gather the tokens' rows of x (no permuted copy), multiply by the gate and up rows
    of w13 dequantized in registers, add b13, apply SwiGLU, store bf16 rows of the intermediate.
    Bytes per program: 2 * BN * Kp / 2 weight bytes + scales, BM * H activations (L2-resident)."""
    pid = tl.program_id(0)
    blk = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(block_expert_ptr + blk)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    rm = blk * BM + tl.arange(0, BM)
    slots = tl.load(sorted_ptr + rm)
    valid = slots >= 0
    tok = tl.where(valid, slots // top_k, 0).to(tl.int64)
    rn = nt * BN + tl.arange(0, BN)
    wg_rows = w_ptr + (e64 * 2 * Ip + rn)[:, None] * KB
    wu_rows = w_ptr + (e64 * 2 * Ip + Ip + rn)[:, None] * KB
    sg_rows = s_ptr + (e64 * 2 * Ip + rn)[:, None] * NSC
    su_rows = s_ptr + (e64 * 2 * Ip + Ip + rn)[:, None] * NSC
    x_rows = x_ptr + tok[:, None] * stride_xm
    if SWAP:
        acc_g = tl.zeros((BN, BM), dtype=tl.float32)
        acc_u = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    rg = tl.arange(0, G)
    nch = Kp // (2 * G)
    # U chunks per iteration, unrolled: their loads are independent, so several are in
    # flight per warp (the loads feed inline asm, which Triton's pipeliner does not stage)
    for c0 in range(0, nch, U):
        for u in tl.static_range(U):
            c = c0 + u
            kl = c * 2 * G + rg
            kh = kl + G
            a_lo = tl.load(x_rows + kl[None, :], mask=valid[:, None] & (kl < H)[None, :], other=0.0).to(CDT)
            a_hi = tl.load(x_rows + kh[None, :], mask=valid[:, None] & (kh < H)[None, :], other=0.0).to(CDT)
            g_lo, g_hi = _load_chunk(wg_rows, sg_rows, c, nch, BN, FMT, G, CDT, ASM)
            u_lo, u_hi = _load_chunk(wu_rows, su_rows, c, nch, BN, FMT, G, CDT, ASM)
            acc_g = _mma(acc_g, a_lo, g_lo, SWAP)
            acc_g = _mma(acc_g, a_hi, g_hi, SWAP)
            acc_u = _mma(acc_u, a_lo, u_lo, SWAP)
            acc_u = _mma(acc_u, a_hi, u_hi, SWAP)
    if SWAP:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    if FMT == 1:
        gs = tl.load(gs_ptr + e)
        acc_g = acc_g * gs
        acc_u = acc_u * gs
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + e64 * 2 * Ip + rn)[None, :]
        acc_u += tl.load(b_ptr + e64 * 2 * Ip + Ip + rn)[None, :]
    if HAS_LIMIT:
        acc_g = tl.minimum(acc_g, limit)
        acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    act = (acc_u + beta) * acc_g * tl.sigmoid(alpha * acc_g)
    tl.store(inter_ptr + rm.to(tl.int64)[:, None] * Ip + rn[None, :], act.to(inter_ptr.dtype.element_ty))


@triton.jit
def moe_gemm2_kernel(
    inter_ptr,                        # [NB * BM, Ip] bf16
    w_ptr, s_ptr, gs_ptr, b_ptr,      # w2 [E, Hp, Ip/2] u8; scales [E, Hp, Ip/G]; gs [E] f32; b2 [E, Hp] f32
    y_ptr,                            # [M * top_k, H] per-slot outputs (fp32)
    sorted_ptr, block_expert_ptr, topk_w_ptr,   # topk_weights flat [M * top_k] f32
    H, Hp, Ip, n_tiles, KB, NSC,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr,
    U: tl.constexpr,
):
    """GEMM2: one block of BM intermediate rows (one expert) times BN rows of w2, plus b2,
    times each slot's routing weight, stored to that slot's row of y (combined later in a
    fixed order, so the result is deterministic)."""
    pid = tl.program_id(0)
    blk = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(block_expert_ptr + blk)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    rm = blk * BM + tl.arange(0, BM)
    slots = tl.load(sorted_ptr + rm)
    valid = slots >= 0
    rn = nt * BN + tl.arange(0, BN)
    w_rows = w_ptr + (e64 * Hp + rn)[:, None] * KB
    s_rows = s_ptr + (e64 * Hp + rn)[:, None] * NSC
    a_rows = inter_ptr + rm.to(tl.int64)[:, None] * Ip
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    rg = tl.arange(0, G)
    nch = Ip // (2 * G)
    for c0 in range(0, nch, U):
        for u in tl.static_range(U):
            c = c0 + u
            kl = c * 2 * G + rg
            a_lo = tl.load(a_rows + kl[None, :], mask=(kl < Ip)[None, :], other=0.0).to(CDT)
            a_hi = tl.load(a_rows + (kl + G)[None, :], mask=(kl < Ip)[None, :], other=0.0).to(CDT)
            w_lo, w_hi = _load_chunk(w_rows, s_rows, c, nch, BN, FMT, G, CDT, ASM)
            acc = _mma(acc, a_lo, w_lo, SWAP)
            acc = _mma(acc, a_hi, w_hi, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    if FMT == 1:
        acc = acc * tl.load(gs_ptr + e)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e64 * Hp + rn)[None, :]
    wt = tl.load(topk_w_ptr + tl.where(valid, slots, 0), mask=valid, other=0.0)
    acc = acc * wt[:, None]
    slot64 = tl.where(valid, slots, 0).to(tl.int64)
    tl.store(y_ptr + slot64[:, None] * H + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (rn < H)[None, :])


@triton.jit
def moe_combine_kernel(
    y_ptr, ids_ptr, shared_ptr, out_ptr,  # y [M * k, H]; ids [M, k] i32; shared [M, H] or dummy; out [M, H]
    H, top_k,
    HAS_SHARED: tl.constexpr, K_P2: tl.constexpr, BH: tl.constexpr,
):
    """out[t] = sum_j y[t * k + j] over slots with an expert (j in order: deterministic)
    (+ shared_output[t]), written in out's dtype. Every element of out is written."""
    t = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = rh < H
    rj = tl.arange(0, K_P2)
    ids = tl.load(ids_ptr + t * top_k + rj, mask=rj < top_k, other=-1)
    use = ids >= 0
    y = tl.load(y_ptr + (t * top_k + rj)[:, None] * H + rh[None, :], mask=use[:, None] & hm[None, :], other=0.0)
    acc = tl.sum(y.to(tl.float32), axis=0)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t * H + rh, mask=hm, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + rh, acc.to(out_ptr.dtype.element_ty), mask=hm)


# ---- token grouping -----------------------------------------------------------------------
# Slots (t * k + j) are sorted by expert into blocks of BM rows, each expert padded to a
# multiple of BM with -1. The row a slot gets inside its expert comes from atomic_add's
# return value, so it can differ between runs; every row is computed independently and the
# combine sums by slot index, so the output does not depend on it (bitwise).

@triton.jit
def _rank_slots(ids_ptr, counts_ptr, rank_ptr, MK, start, CH: tl.constexpr):
    rs = start + tl.arange(0, CH)
    ids = tl.load(ids_ptr + rs, mask=rs < MK, other=-1)
    ok = ids >= 0
    r = tl.atomic_add(counts_ptr + tl.where(ok, ids, 0), 1, mask=ok)
    tl.store(rank_ptr + rs, r, mask=ok)


@triton.jit
def _expert_starts(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, E, NB,
                   BM: tl.constexpr, E_P2: tl.constexpr, NBT: tl.constexpr, FT: tl.constexpr):
    """Padded start row of each expert; the expert of every block; -1 in every sorted row."""
    re = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + re, mask=re < E, other=0, cache_modifier=".cg")
    padded = (cnt + BM - 1) // BM * BM
    end = tl.cumsum(padded, axis=0)
    tl.store(starts_ptr + re, end - padded, mask=re < E)
    bend = tl.where(re < E, end // BM, 2147483647)
    nreal = tl.sum(padded, axis=0) // BM
    for b0 in range(0, NB, NBT):
        rb = b0 + tl.arange(0, NBT)
        # a block's expert = how many experts end at or before it (experts are contiguous)
        be = tl.sum((bend[None, :] <= rb[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + rb, tl.where(rb < nreal, be, -1), mask=rb < NB)
    for p0 in range(0, NB * BM, FT):
        rp = p0 + tl.arange(0, FT)
        tl.store(sorted_ptr + rp, tl.full((FT,), -1, dtype=tl.int32), mask=rp < NB * BM)


@triton.jit
def _place_slots(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, MK, start, CH: tl.constexpr):
    rs = start + tl.arange(0, CH)
    ids = tl.load(ids_ptr + rs, mask=rs < MK, other=-1)
    ok = ids >= 0
    r = tl.load(rank_ptr + rs, mask=ok, other=0)
    st = tl.load(starts_ptr + tl.where(ok, ids, 0), mask=ok, other=0, cache_modifier=".cg")
    tl.store(sorted_ptr + st + r, rs, mask=ok)


@triton.jit
def moe_group_small_kernel(ids_ptr, counts_ptr, starts_ptr, rank_ptr, sorted_ptr, block_expert_ptr,
                           MK, E, NB, BM: tl.constexpr, CH: tl.constexpr, E_P2: tl.constexpr,
                           NBT: tl.constexpr, FT: tl.constexpr):
    """All of the grouping in one program (M * k <= CH): for decode, one launch."""
    re = tl.arange(0, E_P2)
    tl.store(counts_ptr + re, tl.zeros((E_P2,), dtype=tl.int32), mask=re < E)
    tl.debug_barrier()
    _rank_slots(ids_ptr, counts_ptr, rank_ptr, MK, 0, CH)
    tl.debug_barrier()
    _expert_starts(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, E, NB, BM, E_P2, NBT, FT)
    tl.debug_barrier()
    _place_slots(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, MK, 0, CH)


@triton.jit
def moe_rank_kernel(ids_ptr, counts_ptr, rank_ptr, MK, CH: tl.constexpr):
    _rank_slots(ids_ptr, counts_ptr, rank_ptr, MK, tl.program_id(0) * CH, CH)


@triton.jit
def moe_starts_kernel(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, E, NB,
                      BM: tl.constexpr, E_P2: tl.constexpr, NBT: tl.constexpr, FT: tl.constexpr):
    _expert_starts(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, E, NB, BM, E_P2, NBT, FT)


@triton.jit
def moe_place_kernel(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, MK, CH: tl.constexpr):
    _place_slots(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, MK, tl.program_id(0) * CH, CH)


# ---- decode regime: one (token, expert) slot per program, CUDA cores, no grouping ---------
# With few tokens per expert the tensor cores idle while the weights stream, and feeding
# them costs shared-memory layout conversions per tile. These kernels instead decode each
# weight to fp32 in the registers it was loaded into and FMA it with the token's activations
# (broadcast along the rows); the K reduction happens once, at the end.

# 4 packed bytes ($8) -> low-nibble values ($0..$3) and high-nibble values ($4..$7), fp32,
# exact E2M1 values (no scale): build bf16 pairs as in _ASM_E2M1, x 2^126, then split each
# pair into two fp32 (a bf16 is the top half of an fp32).
_ASM_E2M1_F32 = tl.constexpr("""
{
.reg .b32 t0, t1, a, b, k;
mov.b32 k, 0x7E807E80;
prmt.b32 t0, $8, 0, 0x4140;
prmt.b32 t1, $8, 0, 0x4342;
shl.b32 a, t0, 6;  shl.b32 b, t0, 12; and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; shl.b32 $0, a, 16; and.b32 $1, a, 0xFFFF0000;
shl.b32 a, t1, 6;  shl.b32 b, t1, 12; and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; shl.b32 $2, a, 16; and.b32 $3, a, 0xFFFF0000;
shl.b32 a, t0, 2;  shl.b32 b, t0, 8;  and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; shl.b32 $4, a, 16; and.b32 $5, a, 0xFFFF0000;
shl.b32 a, t1, 2;  shl.b32 b, t1, 8;  and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA;
mul.rn.bf16x2 a, a, k; shl.b32 $6, a, 16; and.b32 $7, a, 0xFFFF0000;
}
""")

# int4: fp32 0x43000000 | u << 16 is 128 + u exactly (u < 128); u = code ^ 8; minus 136 gives
# the signed value. Here: place each nibble (xor 8) at bit 16 of an fp32 with exponent 2^7.
_ASM_INT4_F32 = tl.constexpr("""
{
.reg .b32 t0, t1, a, k;
mov.b32 k, 0xC3080000;
prmt.b32 t0, $8, 0, 0x4140;
prmt.b32 t1, $8, 0, 0x4342;
shl.b32 a, t0, 16; and.b32 a, a, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $0, a, k;
and.b32 a, t0, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $1, a, k;
shl.b32 a, t1, 16; and.b32 a, a, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $2, a, k;
and.b32 a, t1, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $3, a, k;
shl.b32 a, t0, 12; and.b32 a, a, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $4, a, k;
shr.b32 a, t0, 4; and.b32 a, a, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $5, a, k;
shl.b32 a, t1, 12; and.b32 a, a, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $6, a, k;
shr.b32 a, t1, 4; and.b32 a, a, 0x000F0000; xor.b32 a, a, 0x43080000; add.f32 $7, a, k;
}
""")


@triton.jit
def _decode_f32(b, FMT: tl.constexpr, ASM: tl.constexpr):
    """b: [BN, G] uint8 packed codes -> (lo, hi): [BN, G] fp32 code values (no scale)."""
    if ASM:
        if FMT == 2:
            lo, hi = tl.inline_asm_elementwise(_ASM_INT4_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_ASM_E2M1_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        return lo, hi
    else:
        b32 = b.to(tl.uint32)
        if FMT == 2:
            return (((b32 & 0xF) ^ 8).to(tl.int32) - 8).to(tl.float32), \
                (((b32 >> 4) ^ 8).to(tl.int32) - 8).to(tl.float32)
        else:
            return _e2m1_to_f32(b32 & 0xF), _e2m1_to_f32(b32 >> 4)


@triton.jit
def _gemv_chunk(acc, a_row_ptr, a_limit, w_rows, s_rows, c,
                BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, MASK: tl.constexpr):
    """acc [BN, G] += w[:, chunk c] * a[chunk c] (both halves), scales applied per row.
    a: fp32 activations; MASK only for a last chunk that runs past a_limit (K not a multiple of 2G)."""
    rg = tl.arange(0, G)
    kl = c * 2 * G + rg
    if MASK:
        a_lo = tl.load(a_row_ptr + kl, mask=kl < a_limit, other=0.0)
        a_hi = tl.load(a_row_ptr + kl + G, mask=kl + G < a_limit, other=0.0)
    else:
        a_lo = tl.load(a_row_ptr + kl)
        a_hi = tl.load(a_row_ptr + kl + G)
    b = tl.load(w_rows + (c * G + rg)[None, :])
    s_lo = _scale_to_f32(tl.load(s_rows + 2 * c).to(tl.uint32), FMT)
    s_hi = _scale_to_f32(tl.load(s_rows + 2 * c + 1).to(tl.uint32), FMT)
    v_lo, v_hi = _decode_f32(b, FMT, ASM)
    acc += v_lo * (a_lo[None, :] * s_lo)
    acc += v_hi * (a_hi[None, :] * s_hi)
    return acc


@triton.jit
def _gemv_rows(acc, a_row, K, w_rows, s_rows, BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
               ASM: tl.constexpr, U: tl.constexpr):
    """acc += w @ a over the logical K: unrolled unmasked chunks, the rest one by one, and a
    masked last chunk if K is not a multiple of 2G (chunks past K hold zero weights: skipped)."""
    nfull = K // (2 * G)
    nmain = nfull // U * U
    for c0 in range(0, nmain, U):
        for u in tl.static_range(U):
            acc = _gemv_chunk(acc, a_row, K, w_rows, s_rows, c0 + u, BN, FMT, G, ASM, False)
    for c in range(nmain, nfull):
        acc = _gemv_chunk(acc, a_row, K, w_rows, s_rows, c, BN, FMT, G, ASM, False)
    if K % (2 * G) != 0:
        acc = _gemv_chunk(acc, a_row, K, w_rows, s_rows, nfull, BN, FMT, G, ASM, True)
    return acc


@triton.jit
def moe_gemv1_kernel(
    x_ptr, stride_xm, w_ptr, s_ptr, gs_ptr, b_ptr,   # x: [M, H] fp32
    inter_ptr,                        # [M * k, Ip] fp32, one row per slot
    ids_ptr,                          # [M * k] i32
    H, Ip, Kp, top_k, n_tiles, KB, NSC,
    alpha, beta, limit,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BN: tl.constexpr, ASM: tl.constexpr, U: tl.constexpr,
):
    """GEMV1 + SwiGLU for one slot (token t, expert e) and BN intermediate columns."""
    pid = tl.program_id(0)
    slot = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(ids_ptr + slot)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    t = (slot // top_k).to(tl.int64)
    rn = nt * BN + tl.arange(0, BN)
    wg_rows = w_ptr + (e64 * 2 * Ip + rn)[:, None] * KB
    wu_rows = w_ptr + (e64 * 2 * Ip + Ip + rn)[:, None] * KB
    sg_rows = s_ptr + (e64 * 2 * Ip + rn)[:, None] * NSC
    su_rows = s_ptr + (e64 * 2 * Ip + Ip + rn)[:, None] * NSC
    x_row = x_ptr + t * stride_xm
    acc_g = _gemv_rows(tl.zeros((BN, G), dtype=tl.float32), x_row, H, wg_rows, sg_rows, BN, FMT, G, ASM, U)
    acc_u = _gemv_rows(tl.zeros((BN, G), dtype=tl.float32), x_row, H, wu_rows, su_rows, BN, FMT, G, ASM, U)
    gate = tl.sum(acc_g, axis=1)
    up = tl.sum(acc_u, axis=1)
    if FMT == 1:
        gs = tl.load(gs_ptr + e)
        gate = gate * gs
        up = up * gs
    if HAS_BIAS:
        gate += tl.load(b_ptr + e64 * 2 * Ip + rn)
        up += tl.load(b_ptr + e64 * 2 * Ip + Ip + rn)
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    act = (up + beta) * gate * tl.sigmoid(alpha * gate)
    tl.store(inter_ptr + slot.to(tl.int64) * Ip + rn, act)


@triton.jit
def moe_gemv2_kernel(
    inter_ptr, w_ptr, s_ptr, gs_ptr, b_ptr,   # inter: [M * k, Ip] fp32
    y_ptr,                            # [M * k, H] fp32 per-slot outputs
    ids_ptr, topk_w_ptr,
    H, Hp, Ip, I, n_tiles, KB, NSC,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
    BN: tl.constexpr, ASM: tl.constexpr, U: tl.constexpr,
):
    """GEMV2 for one slot and BN hidden columns: (inter[slot] @ w2[e].T + b2[e]) * weight."""
    pid = tl.program_id(0)
    slot = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(ids_ptr + slot)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    rn = nt * BN + tl.arange(0, BN)
    w_rows = w_ptr + (e64 * Hp + rn)[:, None] * KB
    s_rows = s_ptr + (e64 * Hp + rn)[:, None] * NSC
    a_row = inter_ptr + slot.to(tl.int64) * Ip
    acc = _gemv_rows(tl.zeros((BN, G), dtype=tl.float32), a_row, I, w_rows, s_rows, BN, FMT, G, ASM, U)
    y = tl.sum(acc, axis=1)
    if FMT == 1:
        y = y * tl.load(gs_ptr + e)
    if HAS_BIAS:
        y += tl.load(b_ptr + e64 * Hp + rn)
    y = y * tl.load(topk_w_ptr + slot)
    tl.store(y_ptr + slot.to(tl.int64) * H + rn, y, mask=rn < H)
