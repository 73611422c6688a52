"""Triton bodies of qmoe's MoE kernels (the public entry is kernels/moe.py).

Formats (FMT constexpr): 0 = mxfp4 (E2M1 + E8M0 per 32), 1 = nvfp4 (E2M1 + E4M3 per 16,
fp32 global scale per expert), 2 = int4 (signed int4 + bf16 per 32). Weights are in the
split-nibble layout of kernels/layout.py: per 128-wide K tile, a row's 64 bytes hold the
tile's first 64 elements in the low nibbles and the last 64 in the high nibbles.
"""

import triton
import triton.language as tl

FMT_MXFP4 = 0
FMT_NVFP4 = 1
FMT_INT4 = 2

_TWO_POW_126 = tl.constexpr(8.507059173023462e37)
_TWO_POW_120 = tl.constexpr(1.329227995784916e36)


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
def _dequant_half(b, s, BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, HI: tl.constexpr):
    """One half (64 elements) of a K tile: b [BN, 64] uint32 bytes, s [BN, 64 // G] fp32 scales
    -> [BN, 64] fp32 weights."""
    if HI:
        c = b >> 4
    else:
        c = b & 0xF
    if FMT == 2:
        v = ((c ^ 8).to(tl.int32) - 8).to(tl.float32)
    else:
        v = _e2m1_to_f32(c)
    v = tl.reshape(v, (BN, 64 // G, G)) * s[:, :, None]
    return tl.reshape(v, (BN, 64))


@triton.jit
def _load_tile(w_row_ptr, s_row_ptr, k0, BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
               CDT: tl.constexpr):
    """Load and dequantize one 128-wide K tile of BN rows.

    w_row_ptr: [BN, 1] pointers to each row's packed bytes; s_row_ptr: [BN, 1] pointers to
    each row's scales. Returns (lo, hi): [BN, 64] each in CDT (the first / last 64 elements)."""
    NS: tl.constexpr = 64 // G
    b = tl.load(w_row_ptr + (k0 // 2 + tl.arange(0, 64))[None, :]).to(tl.uint32)
    sg = k0 // G
    s_lo = _scale_to_f32(tl.load(s_row_ptr + (sg + tl.arange(0, NS))[None, :]).to(tl.uint32), FMT)
    s_hi = _scale_to_f32(tl.load(s_row_ptr + (sg + NS + tl.arange(0, NS))[None, :]).to(tl.uint32), FMT)
    lo = _dequant_half(b, s_lo, BN, FMT, G, False).to(CDT)
    hi = _dequant_half(b, s_hi, BN, FMT, G, True).to(CDT)
    return lo, hi


@triton.jit
def _mma(acc, a_lo, a_hi, w_lo, w_hi, SWAP: tl.constexpr):
    """acc += a @ w.T over one K tile; with SWAP the accumulator is transposed ([BN, BM]) so the
    dequantized weight is the MMA's first operand."""
    if SWAP:
        acc = tl.dot(w_lo, tl.trans(a_lo), acc)
        acc = tl.dot(w_hi, tl.trans(a_hi), acc)
    else:
        acc = tl.dot(a_lo, tl.trans(w_lo), acc)
        acc = tl.dot(a_hi, tl.trans(w_hi), acc)
    return acc


@triton.jit
def moe_gemm1_kernel(
    x_ptr, stride_xm,                 # [M, H] activations
    w_ptr, s_ptr, gs_ptr, b_ptr,      # w13 [E, 2Ip, Kp/2] u8; scales [E, 2Ip, Kp/G]; gs [E] f32; b13 [E, 2Ip] f32
    inter_ptr,                        # [NB * BM, Ip] bf16 (sorted, padded rows)
    sorted_ptr, block_expert_ptr,     # [NB * BM] i32 slot ids (-1 = padding); [NB] i32 expert (-1 = no block)
    H, Ip, Kp, top_k, n_tiles,
    alpha, beta, limit,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, CDT: tl.constexpr,
):
    """GEMM1 + SwiGLU: for one block of BM sorted token slots of one expert and BN intermediate
    columns, gather the tokens' rows of x (no permuted copy), multiply by the gate and up rows
    of w13 dequantized in registers, add b13, apply SwiGLU, store bf16 rows of the intermediate.
    Bytes moved per program: 2 * BN * Kp/2 weight bytes + their scales, BM * H activations."""
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
    KB = Kp // 2
    NSC = Kp // G
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
    rk = tl.arange(0, 64)
    for k0 in range(0, Kp, 128):
        kl = k0 + rk
        kh = k0 + 64 + rk
        a_lo = tl.load(x_rows + kl[None, :], mask=valid[:, None] & (kl < H)[None, :], other=0.0).to(CDT)
        a_hi = tl.load(x_rows + kh[None, :], mask=valid[:, None] & (kh < H)[None, :], other=0.0).to(CDT)
        g_lo, g_hi = _load_tile(wg_rows, sg_rows, k0, BN, FMT, G, CDT)
        acc_g = _mma(acc_g, a_lo, a_hi, g_lo, g_hi, SWAP)
        u_lo, u_hi = _load_tile(wu_rows, su_rows, k0, BN, FMT, G, CDT)
        acc_u = _mma(acc_u, a_lo, a_hi, u_lo, u_hi, SWAP)
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
    H, Hp, Ip, n_tiles,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, CDT: tl.constexpr,
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
    KB = Ip // 2
    NSC = Ip // G
    w_rows = w_ptr + (e64 * Hp + rn)[:, None] * KB
    s_rows = s_ptr + (e64 * Hp + rn)[:, None] * NSC
    a_rows = inter_ptr + rm.to(tl.int64)[:, None] * Ip
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    rk = tl.arange(0, 64)
    for k0 in range(0, Ip, 128):
        a_lo = tl.load(a_rows + (k0 + rk)[None, :]).to(CDT)
        a_hi = tl.load(a_rows + (k0 + 64 + rk)[None, :]).to(CDT)
        w_lo, w_hi = _load_tile(w_rows, s_rows, k0, BN, FMT, G, CDT)
        acc = _mma(acc, a_lo, a_hi, w_lo, w_hi, SWAP)
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


@triton.jit
def moe_group_small_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr,   # ids [MK] i32; sorted [NB * BM] i32 (out); block_expert [NB] (out)
    MK, E, NB,
    BM: tl.constexpr, MK_P2: tl.constexpr, ET: tl.constexpr, NB_P2: tl.constexpr, POS_P2: tl.constexpr,
):
    """Token grouping in ONE program (for M * k <= MK_P2 <= 1024): sort the M * k slots by
    expert into blocks of BM rows, each expert's rows padded to a multiple of BM with -1.
    No host synchronization: sizes are upper bounds known from M alone."""
    rs = tl.arange(0, MK_P2)
    ids = tl.load(ids_ptr + rs, mask=rs < MK, other=-1)
    key = tl.where(ids >= 0, ids, -1)  # dropped slots match no expert (tiles hold ids >= 0)
    rank = tl.zeros((MK_P2,), dtype=tl.int32)
    start = tl.zeros((MK_P2,), dtype=tl.int32)
    rb = tl.arange(0, NB_P2)
    bexp = tl.full((NB_P2,), -1, dtype=tl.int32)
    carry = 0
    for e0 in range(0, E, ET):
        re = e0 + tl.arange(0, ET)
        onehot = (key[:, None] == re[None, :]).to(tl.int32)          # [MK_P2, ET]
        cnt = tl.sum(onehot, axis=0)                                    # [ET]
        padded = (cnt + BM - 1) // BM * BM
        estart = carry + tl.cumsum(padded, axis=0) - padded            # [ET] padded start of each expert
        carry += tl.sum(padded, axis=0)
        before = tl.cumsum(onehot, axis=0) - onehot                    # rank among same-expert slots
        rank += tl.sum(before * onehot, axis=1)
        start += tl.sum(onehot * estart[None, :], axis=1)
        bstart = estart // BM
        bend = (estart + padded) // BM
        inb = (rb[:, None] >= bstart[None, :]) & (rb[:, None] < bend[None, :])
        bexp = tl.maximum(bexp, tl.max(tl.where(inb, re[None, :], -1), axis=1))
    tl.store(block_expert_ptr + rb, bexp, mask=rb < NB)
    rp = tl.arange(0, POS_P2)
    tl.store(sorted_ptr + rp, tl.full((POS_P2,), -1, dtype=tl.int32), mask=rp < NB * BM)
    tl.debug_barrier()  # the padding fill above must land before the real slots below
    tl.store(sorted_ptr + start + rank, rs, mask=key >= 0)
