"""Triton bodies of qmoe's MoE kernels (the public entry is kernels/moe.py).

The packed weights' strides (WE, WR, WP: expert, row and panel, in bytes; PB, a panel's bytes per
row, is a constexpr) and their scales' row stride (NSC) are kernel arguments, not computed
inside: Triton specializes integer arguments divisible by 16, and only then can it prove 16-byte
aligned rows and issue 16-byte loads (computed strides gave one-byte loads, 16x the load
instructions).

Formats (FMT constexpr): 0 = mxfp4 (E2M1 + E8M0 per 32), 1 = nvfp4 (E2M1 + E4M3 per 16,
fp32 global scale per expert), 2 = int4 (signed int4 + bf16 per 32). Weights are in the
layout of kernels/layout.py: K in halves of G elements (one scale group each; a chunk is two
halves, its "low" and "high" half) and quads of four halves (a pair of chunks c, c + 1, c
even): 2G bytes per row, read as G 16-bit elements; each 4-byte word q (two of them) holds the
eight codes of elements 2q and 2q + 1 of each of the quad's four halves, which its decode turns
into four bf16 pairs, with their bits where the decode wants them (layout.E2M1_WORD_BITS,
layout.INT4_WORD_BITS). 16-bit elements, pairs of them per decode, are what mma.sync's bf16
operands hold per register: Triton then keeps the MMAs' operands in their native register
layout (kWidth 2), so the activations come from shared memory by ldmatrix and no register is
moved between the decode and the MMA (docs/performance.md, session 7).

Decoding is the hot spot: at decode batch sizes the kernels are bound by instructions per
weight, not by bytes. On a GPU (ASM=True) one 32-bit word of packed E2M1 codes becomes
eight bf16 values with rotations and masks and one bf16x2 multiply per pair that applies
the scale (13 instructions per 8 weights; docs/performance.md, v4); the interpreter
(ASM=False) decodes the same words element by element in fp32.
"""

import triton
import triton.language as tl

from .activation import swiglu
from .layout import NVFP4_CODE_BIAS

FMT_MXFP4 = 0
FMT_NVFP4 = 1
FMT_INT4 = 2

_TWO_POW_126 = tl.constexpr(8.507059173023462e37)
_TWO_POW_120 = tl.constexpr(1.329227995784916e36)
_TWO_POW_118 = tl.constexpr(3.323069989462290e35)
_TWO_POW_M118 = tl.constexpr(3.009265538105056e-36)
_NVFP4_CODE_BIAS = tl.constexpr(NVFP4_CODE_BIAS)
NVFP4_POST = 256.0
"""nvfp4 on the GPU: scales enter the decode as E4M3 x 2^118 (so E2M1 x 2^-126 times the
scale is exact in bf16 and never overflows); the accumulator is multiplied by 2^8 after."""
_NVFP4_POST = tl.constexpr(NVFP4_POST)

# E2M1: one 32-bit word of packed codes ($4: elements 2q, 2q + 1 of a chunk pair, arranged by
# layout.E2M1_WORD_BITS) -> four bf16 pairs, $t = elements 2q, 2q + 1 of the pair's half t (lo_c,
# hi_c, lo_c+1, hi_c+1). Rotations and masks put each pair's sign and magnitude bits where a
# bf16 wants them (value x 2^-126, exact); one bf16x2 multiply applies half t's scale ($5 + t),
# which already carries the 2^126. 13 instructions per 8 weights.
_ASM_E2M1 = tl.constexpr("""
{
.reg .b32 a, b;
and.b32 a, $4, 0x81C081C0; mul.rn.bf16x2 $0, a, $5;
shf.l.wrap.b32 a, $4, $4, 4; and.b32 a, a, 0x81C081C0; mul.rn.bf16x2 $1, a, $6;
shf.l.wrap.b32 a, $4, $4, 10; and.b32 a, a, 0x81C081C0; mul.rn.bf16x2 $2, a, $7;
shf.l.wrap.b32 a, $4, $4, 6; shf.l.wrap.b32 b, $4, $4, 14; and.b32 b, b, 0x01000100;
lop3.b32 a, a, 0x80C080C0, b, 0xEA; mul.rn.bf16x2 $3, a, $8;
}
""")

# The same where scale x 2^126 would overflow bf16 (mxfp4 scales above 2^1): x 2^126
# (0x7E80) first, then the plain scale.
_ASM_E2M1_UNFOLDED = tl.constexpr("""
{
.reg .b32 a, b, k;
mov.b32 k, 0x7E807E80;
and.b32 a, $4, 0x81C081C0; mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $0, a, $5;
shf.l.wrap.b32 a, $4, $4, 4; and.b32 a, a, 0x81C081C0; mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $1, a, $6;
shf.l.wrap.b32 a, $4, $4, 10; and.b32 a, a, 0x81C081C0; mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $2, a, $7;
shf.l.wrap.b32 a, $4, $4, 6; shf.l.wrap.b32 b, $4, $4, 14; and.b32 b, b, 0x01000100;
lop3.b32 a, a, 0x80C080C0, b, 0xEA; mul.rn.bf16x2 a, a, k; mul.rn.bf16x2 $3, a, $8;
}
""")

# int4 (layout.INT4_WORD_BITS: pair j at nibble j of each 16-bit lane; the pairs and scales as for
# E2M1, so $0 = (c0, c1), $1 = (c2, c3), $2 = (c4, c5), $3 = (c6, c7)): bf16 0x4300 | u is 128 + u
# exactly for u < 128; u = code ^ 8 maps -8..7 to 0..15, so (0x4300 | (code ^ 8)) - 136 is the
# signed value; then x scale. lop3 0x6A = (a & b) ^ c. 15 instructions per 8 weights.
_ASM_INT4 = tl.constexpr("""
{
.reg .b32 t, a, k;
mov.b32 k, 0x43084308;
lop3.b32 a, $4, 0x000F000F, k, 0x6A; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $0, a, $5;
shr.b32 t, $4, 4; lop3.b32 a, t, 0x000F000F, k, 0x6A; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $1, a, $6;
shr.b32 t, $4, 8; lop3.b32 a, t, 0x000F000F, k, 0x6A; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $2, a, $7;
shr.b32 t, $4, 12; lop3.b32 a, t, 0x000F000F, k, 0x6A; sub.rn.bf16x2 a, a, k; mul.rn.bf16x2 $3, a, $8;
}
""")


@triton.jit
def _e2m1_to_f32(c):
    """uint32 codes 0..15 -> fp32: the code's 3 magnitude bits become the low exponent
    bits and top mantissa bit of an fp32 (exact, subnormal 0.5 included), scaled back by 2^126."""
    bits = ((c & 8) << 28) | ((c & 7) << 22)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_126


@triton.jit
def _nvfp4_code_bits(s):
    """nvfp4 scale codes (uint32) -> the bf16 bits of scale x 2^118 (layout.NVFP4_CODE_BIAS)."""
    return s * 16 + _NVFP4_CODE_BIAS


@triton.jit
def _scale_to_f32(s, FMT: tl.constexpr, FOLD: tl.constexpr):
    """Raw scale bytes (uint32 of uint8 / int16 bits) -> fp32 scale; nvfp4 with FOLD: scale codes
    (layout.nvfp4_scale_codes)."""
    if FMT == 1 and FOLD:   # code 0 reads as a finite scale, as on the GPU (its codes are +-0)
        return (_nvfp4_code_bits(s) << 16).to(tl.float32, bitcast=True) * _TWO_POW_M118
    elif FMT == 0:  # E8M0: 2^(s-127); 0 -> 2^-127 (subnormal), 255 -> NaN
        bits = (s << 23) | tl.where((s == 0) | (s == 255), 0x400000, 0)
        return bits.to(tl.float32, bitcast=True)
    elif FMT == 1:  # E4M3 (fn): place eeee.mmm in an fp32, rescale by 2^120; 0x7F/0xFF are NaN
        mag = ((s & 0x7F) << 20).to(tl.float32, bitcast=True) * _TWO_POW_120
        v = tl.where((s & 0x80) != 0, -mag, mag)
        return tl.where((s & 0x7F) == 0x7F, float("nan"), v)
    else:  # bf16 bits
        return ((s & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _scale_for_asm(s, FMT: tl.constexpr, FOLD: tl.constexpr):
    """Raw scales (uint32 of the raw bits) -> the bf16 the GPU decode multiplies by:
    mxfp4 folded 2^(s-1) (= scale x 2^126, exact for s <= 128: one integer op), mxfp4
    unfolded 2^(s-127) (0 -> 2^-127, 255 -> NaN), nvfp4 E4M3 x 2^118 (FOLD: from the scale
    code; a zero scale's code reads as a finite value, which only +-0 codes meet), int4 the bf16."""
    if FMT == 0:
        if FOLD:
            bits = (s + 126) << 7
        else:
            bits = tl.where(s == 0, 0x40, tl.where(s == 255, 0x7FC0, s << 7))
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif FMT == 1:
        if FOLD:   # a scale code: the bf16 bits in one integer instruction
            return _nvfp4_code_bits(s).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return (_scale_to_f32(s, 1, False) * _TWO_POW_118).to(tl.bfloat16)
    else:
        return s.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _word_code(w, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr):
    return ((w >> B0) & 1) | (((w >> B1) & 1) << 1) | (((w >> B2) & 1) << 2) | (((w >> B3) & 1) << 3)


@triton.jit
def _interleave2(a, b):
    """[R, Q] x 2 -> [R, 2Q] with out[:, 2q] = a[:, q], out[:, 2q + 1] = b[:, q]."""
    x = tl.join(a, b)
    return tl.reshape(x, (x.shape[0], 2 * x.shape[1]))


@triton.jit
def _pair_codes(w_rows, c, G: tl.constexpr, FMT: tl.constexpr, WP, PB: tl.constexpr):
    """Interpreter path: the codes of chunks c, c + 1 (c even) as their four halves (lo_c, hi_c,
    lo_c+1, hi_c+1), [BN, G] uint32 each, from the arranged words (word q: elements 2q, 2q + 1)."""
    q = tl.arange(0, G // 2)
    w = tl.load((w_rows + _chunk_at(c, G, WP, PB) + (4 * q)[None, :]).to(tl.pointer_type(tl.uint32)))
    if FMT == 2:   # layout.INT4_WORD_BITS
        return (_interleave2(w & 0xF, (w >> 16) & 0xF), _interleave2((w >> 4) & 0xF, (w >> 20) & 0xF),
                _interleave2((w >> 8) & 0xF, (w >> 24) & 0xF), _interleave2((w >> 12) & 0xF, (w >> 28) & 0xF))
    else:          # layout.E2M1_WORD_BITS
        return (_interleave2(_word_code(w, 6, 7, 8, 15), _word_code(w, 22, 23, 24, 31)),
                _interleave2(_word_code(w, 2, 3, 4, 11), _word_code(w, 18, 19, 20, 27)),
                _interleave2(_word_code(w, 28, 29, 30, 5), _word_code(w, 12, 13, 14, 21)),
                _interleave2(_word_code(w, 0, 1, 26, 9), _word_code(w, 16, 17, 10, 25)))


@triton.jit
def _chunk_at(c, G: tl.constexpr, WP, PB: tl.constexpr):
    """Where chunk c (G bytes of a row; c even: a pair's 2G bytes, which never straddle panels)
    starts, in bytes from its row's start: panel c G / PB (panels of PB bytes per row, WP bytes
    apart: layout.PANEL), then its place in the panel. The row order is WP = PB. The place is a
    difference, not a remainder: Triton's alignment analysis keeps a difference's divisibility (G)
    and drops a remainder's, and without it the loads become 2-byte ones."""
    p = c * G // PB
    return p * WP + (c * G - p * PB)


@triton.jit
def _chunk_scales(s_rows, c):
    """Raw scales (uint32 [BN, 1]) of chunk c's low and high halves; s_rows: [BN, 1] pointers to
    each row's scales."""
    return tl.load(s_rows + 2 * c).to(tl.uint32), tl.load(s_rows + 2 * c + 1).to(tl.uint32)


@triton.jit
def _pair_scales(s_rows, c, FMT: tl.constexpr):
    """Raw scales of chunks c and c + 1 (c even) from one load, (lo_c, hi_c, lo_c+1, hi_c+1): a
    32-bit word of one-byte scales (E8M0, E4M3), a 64-bit one of int4's bf16. A 32- or 64-bit
    load can be staged through shared memory by cp.async with the weights (Triton pipelines it);
    one-byte loads cannot, and every loop iteration then waits on memory for its scales. Needs
    the scale rows aligned to the load's size (MoEKernelWeights.scale_row_align; c even)."""
    if FMT == 2:
        w, v = _load_u64(s_rows + 2 * c)
        return w & 0xFFFF, w >> 16, v & 0xFFFF, v >> 16
    w = tl.load((s_rows + 2 * c).to(tl.pointer_type(tl.uint32)))
    return w & 0xFF, (w >> 8) & 0xFF, (w >> 16) & 0xFF, w >> 24


@triton.jit
def _load_u64(p):
    """One 64-bit load at byte pointers p (8-byte aligned) -> its (low, high) 32-bit halves."""
    d = tl.load(p.to(tl.pointer_type(tl.uint64)))
    return d.to(tl.uint32), (d >> 32).to(tl.uint32)


@triton.jit
def _quad_byte_scales(s_rows, c):
    """One-byte scales of chunks c .. c + 3 (c a multiple of 4; rows 8-byte aligned) from one
    64-bit load: (lo_c, hi_c, ..., lo_c+3, hi_c+3)."""
    w, v = _load_u64(s_rows + 2 * c)
    return (w & 0xFF, (w >> 8) & 0xFF, (w >> 16) & 0xFF, w >> 24,
            v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF, v >> 24)


@triton.jit
def _group_scales(s_rows, c0, U: tl.constexpr, FMT: tl.constexpr, WORDS: tl.constexpr):
    """The raw scales of chunks c0 .. c0 + U - 1 (U and c0 even: whole pairs), (lo, hi) of each in
    turn: 2U values. WORDS 0: a load per scale; 1: two chunks per load (`_pair_scales`); 2 (scale
    rows 8-byte aligned): also four chunks of one-byte scales per 64-bit load, where U is a
    multiple of 4 (c0 then is too)."""
    t = ()
    if WORDS == 2 and FMT != 2 and U % 4 == 0:
        for u in tl.static_range(0, U, 4):
            t = t + _quad_byte_scales(s_rows, c0 + u)
    elif WORDS > 0:
        for u in tl.static_range(0, U, 2):
            t = t + _pair_scales(s_rows, c0 + u, FMT)
    else:
        for u in tl.static_range(U):
            t = t + _chunk_scales(s_rows, c0 + u)
    return t


@triton.jit
def _pair_half(codes, sc, FMT: tl.constexpr, FOLD: tl.constexpr, CDT: tl.constexpr):
    """Interpreter path: one half's codes [BN, G] and raw scale [BN, 1] -> values in CDT."""
    if FMT == 2:
        v = ((codes ^ 8).to(tl.int32) - 8).to(tl.float32)
    else:
        v = _e2m1_to_f32(codes)
    return (v * _scale_to_f32(sc, FMT, FOLD)).to(CDT)


@triton.jit
def _load_pair(w_rows, WP, PB: tl.constexpr, sc, c, BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
               CDT: tl.constexpr, ASM: tl.constexpr, FOLD: tl.constexpr):
    """Chunks c and c + 1 (c even, 4G elements) of BN rows -> their four halves (lo_c, hi_c,
    lo_c+1, hi_c+1): [BN, G] each in CDT, scales applied (on the GPU, nvfp4 values come out
    x 2^-8: see NVFP4_POST). No masks: the weights are padded, callers only ask for chunks that
    exist.

    w_rows: [BN, 1] pointers to each row's packed bytes, WP, PB: their panels (`_chunk_at`); sc: the
    four halves' raw scales, uint32 [BN, 1] each (`_group_scales`)."""
    s0, s1, s2, s3 = sc
    if ASM:
        # G 16-bit elements per row; the decode takes two (one word) and gives each half a bf16 pair
        w = tl.load((w_rows + _chunk_at(c, G, WP, PB)).to(tl.pointer_type(tl.int16)) + tl.arange(0, G)[None, :])
        b0 = tl.broadcast_to(_scale_for_asm(s0, FMT, FOLD), (BN, G))
        b1 = tl.broadcast_to(_scale_for_asm(s1, FMT, FOLD), (BN, G))
        b2 = tl.broadcast_to(_scale_for_asm(s2, FMT, FOLD), (BN, G))
        b3 = tl.broadcast_to(_scale_for_asm(s3, FMT, FOLD), (BN, G))
        if FMT == 2:
            asm: tl.constexpr = _ASM_INT4
        elif FOLD or FMT == 1:   # nvfp4 scales x 2^118 always fit a bf16 (FOLD: whether they are codes)
            asm: tl.constexpr = _ASM_E2M1
        else:
            asm: tl.constexpr = _ASM_E2M1_UNFOLDED
        return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r,r,r,r", [w, b0, b1, b2, b3],
                                         dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=2)
    else:
        q0, q1, q2, q3 = _pair_codes(w_rows, c, G, FMT, WP, PB)
        return (_pair_half(q0, s0, FMT, FOLD, CDT), _pair_half(q1, s1, FMT, FOLD, CDT),
                _pair_half(q2, s2, FMT, FOLD, CDT), _pair_half(q3, s3, FMT, FOLD, CDT))


@triton.jit
def _join_quad(h):
    """A quad's four halves (lo_c, hi_c, lo_c+1, hi_c+1), [BN, G] each -> [BN, 4G] in K order (half t
    at columns tG .. tG + G - 1). On the GPU it moves no data: a thread holds the same elements of
    each half, and a 16-column MMA step sees 16 columns of one half.

    Why: with the weight first (SWAP) on Hopper, Triton keeps wgmmas in flight past a dot only for
    one dot per accumulator per loop iteration (k_unroll 2). nvfp4's halves (G = 16) are one MMA
    step each, so one dot per quad is what lets them overlap the next quad's decode; for G = 32
    its registers cost more than the overlap gives (docs/performance.md, session 9). The same
    16-column steps in the same order, so the same sums."""
    p = tl.join(tl.join(h[0], h[1]), tl.join(h[2], h[3]))      # [BN, G, 2, 2]: [n, j, a, b] = half 2b + a
    p = tl.permute(p, (0, 3, 2, 1))                            # [n, b, a, j]
    return tl.reshape(p, (p.shape[0], 4 * p.shape[3]))


@triton.jit
def _mma(acc, a, w, SWAP: tl.constexpr):
    """acc += a @ w.T; with SWAP the accumulator is transposed ([BN, BM]) so the dequantized
    weight is the MMA's first operand (from registers) and the gathered rows the second."""
    if SWAP:
        return tl.dot(w, tl.trans(a), acc)
    else:
        return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _quad_rows(rows, mask, c, G: tl.constexpr, CDT: tl.constexpr, H):
    """The rows' K columns of chunks c, c + 1 (4G), [R, 4G] in CDT; mask: the rows', [R, 1]; H: None
    (all columns inside the row: no column mask), or columns from H on read 0."""
    k = c * 2 * G + tl.arange(0, 4 * G)
    if H is None:
        return tl.load(rows + k[None, :], mask=mask, other=0.0).to(CDT)
    else:
        return tl.load(rows + k[None, :], mask=mask & (k < H)[None, :], other=0.0).to(CDT)


@triton.jit
def _direct_counts(ids_ptr, MK, E, BM: tl.constexpr, MKP: tl.constexpr):
    """The slots [MKP] (s), their expert ids (-1: none), ok, each slot's place among its expert's
    slots (row), whether it is its expert's first (first) and, there, the expert's blocks of BM
    (nblk; 0 elsewhere)."""
    s = tl.arange(0, MKP)
    ids = tl.load(ids_ptr + s, mask=s < MK, other=-1)
    ok = (ids >= 0) & (ids < E)
    ids = tl.where(ok, ids, -1)
    same = (ids[None, :] == ids[:, None]) & ok[None, :]                    # [MKP, MKP]
    count = tl.sum(same.to(tl.int32), axis=1)                              # slots of my expert
    row = tl.sum((same & (s[None, :] < s[:, None])).to(tl.int32), axis=1)  # my place among them
    first = ok & (row == 0)
    return s, ids, ok, row, first, tl.where(first, (count + BM - 1) // BM, 0)


@triton.jit
def _direct_blocks(ids_ptr, MK, E, BM: tl.constexpr, MKP: tl.constexpr):
    """How many blocks `_direct_block` finds: the slots' distinct experts, each in blocks of BM."""
    _, _, _, _, _, nblk = _direct_counts(ids_ptr, MK, E, BM, MKP)
    return tl.sum(nblk, axis=0)


@triton.jit
def _direct_block(ids_ptr, MK, E, blk, BM: tl.constexpr, MKP: tl.constexpr):
    """The grouping done inside the GEMM, for few slots (M * k <= MKP): the slots' distinct
    experts in order of their first slot, each cut into blocks of BM of its slots (in slot
    order); block blk is the blk-th such block. Returns (its expert, or -1 when there are fewer
    blocks, slot ids [BM] (-1 = padding), valid [BM]). Ids outside [0, E) are no expert (the
    combine poisons their token's row). Costs O(MKP^2) integer work per program, no memory."""
    s, ids, ok, row, first, nblk = _direct_counts(ids_ptr, MK, E, BM, MKP)
    end = tl.cumsum(nblk, axis=0)
    start = end - nblk
    hit = first & (start <= blk) & (blk < end)
    e = tl.max(tl.where(hit, ids, -1), axis=0)
    chunk = blk - tl.max(tl.where(hit, start, -1), axis=0)
    mine = ok & (ids == e)
    r = chunk * BM + tl.arange(0, BM)
    sel = mine[None, :] & (row[None, :] == r[:, None])                     # [BM, MKP]: row r is slot s
    valid = tl.sum(sel.to(tl.int32), axis=1) > 0
    slots = tl.where(valid, tl.sum(tl.where(sel, s[None, :], 0), axis=1), -1)
    return e, slots, valid


@triton.jit
def _block(ids_ptr, MK, E, sorted_ptr, block_expert_ptr, blk, BM: tl.constexpr, DIRECT: tl.constexpr,
           MKP: tl.constexpr):
    """Block blk's expert (-1: no block), inter row indices [BM], slot ids [BM] and valid [BM],
    from the grouping's arrays or (DIRECT) computed here from the ids."""
    rm = blk * BM + tl.arange(0, BM)
    if DIRECT:
        e, slots, valid = _direct_block(ids_ptr, MK, E, blk, BM, MKP)
    else:
        e = tl.load(block_expert_ptr + blk)
        slots = tl.load(sorted_ptr + rm)
        valid = slots >= 0
    return e, rm, slots, valid


@triton.jit
def _split_chunks(nch, sk, SPLIT: tl.constexpr, U: tl.constexpr):
    """Chunks [lo, hi) of split sk when nch K chunks are cut into SPLIT parts of ceil(nch / SPLIT)
    rounded up to a multiple of U (whole loop iterations: even starts, whole pairs); the last parts
    are shorter or empty (an empty part contributes a zero partial sum)."""
    per = ((nch + SPLIT - 1) // SPLIT + U - 1) // U * U
    lo = sk * per
    return lo, tl.minimum(lo + per, nch)


@triton.jit
def _pdl_begin(PDL: tl.constexpr):
    """With programmatic dependent launch: let the next kernel of the stream launch now (its own
    wait keeps it correct), then wait until the previous one's results are visible. Weights are
    never written by earlier kernels, so only reads of x, ids and intermediates need the wait."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _nvfp4_global_scale(gs_ptr, e, ASM: tl.constexpr):
    """Expert e's nvfp4 global scale, times NVFP4_POST on the GPU (its decode leaves 2^-8 out)."""
    gs = tl.load(gs_ptr + e)
    if ASM:
        gs = gs * _NVFP4_POST
    return gs


@triton.jit
def _gemm1_pair(acc_g, acc_u, x_rows, valid, H, wg_rows, wu_rows, WP, PB: tl.constexpr, sg, su, c,
                BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr,
                FOLD: tl.constexpr, SWAP: tl.constexpr, MASK: tl.constexpr):
    """acc_g / acc_u += x rows (chunks c, c + 1) @ gate / up rows (chunks c, c + 1)^T; sg, su: the
    gate's and up's raw scales of the pair's four halves. Padding rows (valid False) are not read
    (no memory traffic); MASK: x columns >= H read 0 too."""
    g = _load_pair(wg_rows, WP, PB, sg, c, BN, FMT, G, CDT, ASM, FOLD)
    u = _load_pair(wu_rows, WP, PB, su, c, BN, FMT, G, CDT, ASM, FOLD)
    if SWAP and G == 16:   # one MMA per quad and matrix (`_join_quad`)
        if MASK:
            a = _quad_rows(x_rows, valid[:, None], c, G, CDT, H)
        else:
            a = _quad_rows(x_rows, valid[:, None], c, G, CDT, None)
        return _mma(acc_g, a, _join_quad(g), SWAP), _mma(acc_u, a, _join_quad(u), SWAP)
    for i in tl.static_range(4):
        k = c * 2 * G + i * G + tl.arange(0, G)
        if MASK:
            a = tl.load(x_rows + k[None, :], mask=valid[:, None] & (k < H)[None, :], other=0.0).to(CDT)
        else:
            a = tl.load(x_rows + k[None, :], mask=valid[:, None], other=0.0).to(CDT)
        acc_g = _mma(acc_g, a, g[i], SWAP)
        acc_u = _mma(acc_u, a, u[i], SWAP)
    return acc_g, acc_u


@triton.jit
def _gemm2_pair(acc, a_rows, valid, w_rows, WP, PB: tl.constexpr, sc, c, BN: tl.constexpr, FMT: tl.constexpr,
                G: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr, FOLD: tl.constexpr, SWAP: tl.constexpr):
    """acc += intermediate rows (chunks c, c + 1) @ w2 rows (chunks c, c + 1)^T; sc: the raw scales
    of the pair's four halves; padding rows are not read."""
    w = _load_pair(w_rows, WP, PB, sc, c, BN, FMT, G, CDT, ASM, FOLD)
    if SWAP and G == 16:   # one MMA per quad (`_join_quad`)
        return _mma(acc, _quad_rows(a_rows, valid[:, None], c, G, CDT, None), _join_quad(w), SWAP)
    for i in tl.static_range(4):
        k = c * 2 * G + i * G + tl.arange(0, G)
        a = tl.load(a_rows + k[None, :], mask=valid[:, None], other=0.0).to(CDT)
        acc = _mma(acc, a, w[i], SWAP)
    return acc


@triton.jit
def _gemm1_k(acc_g, acc_u, x_rows, valid, H, wg_rows, wu_rows, WP, PB: tl.constexpr, sg_rows, su_rows, c_lo, c_main,
             c_hi, BN: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr,
             FOLD: tl.constexpr, SWAP: tl.constexpr, U: tl.constexpr, WORDS: tl.constexpr, WHOLE: tl.constexpr):
    """GEMM1's K loop over chunks [c_lo, c_hi): U chunks per iteration up to c_main (in pairs,
    unrolled: their loads are independent; no masks unless WHOLE), then the rest pair by pair, x
    masked at H (past H's last whole iteration, K padding included)."""
    for c0 in range(c_lo, c_main, U):
        sg = _group_scales(sg_rows, c0, U, FMT, WORDS)
        su = _group_scales(su_rows, c0, U, FMT, WORDS)
        for u in tl.static_range(0, U, 2):
            acc_g, acc_u = _gemm1_pair(acc_g, acc_u, x_rows, valid, H, wg_rows, wu_rows, WP, PB, sg[2 * u:2 * u + 4],
                                       su[2 * u:2 * u + 4], c0 + u, BN, FMT, G, CDT, ASM, FOLD, SWAP, WHOLE)
    # not pipelined: pipelined, it raised the kernel's registers from 120 to 159 (mxfp4)
    for c in tl.range(c_main, c_hi, 2, num_stages=1):
        acc_g, acc_u = _gemm1_pair(acc_g, acc_u, x_rows, valid, H, wg_rows, wu_rows, WP, PB,
                                   _group_scales(sg_rows, c, 2, FMT, WORDS), _group_scales(su_rows, c, 2, FMT, WORDS),
                                   c, BN, FMT, G, CDT, ASM, FOLD, SWAP, True)
    return acc_g, acc_u


@triton.jit
def _gemm1_tile(x_ptr, stride_xm, w_ptr, s_ptr, slots, valid, top_k, e, nt, Ip, WE, WR, NSC, BM: tl.constexpr,
                BN: tl.constexpr, SWAP: tl.constexpr):
    """One tile's set-up: its intermediate columns rn [BN]; the row pointers of x for its tokens
    [BM, 1], of w13's gate and up rows [BN, 1] and their scale rows [BN, 1] of expert e; and the two
    accumulators at zero ([BN, BM] with the weight first, else [BM, BN])."""
    tok = tl.where(valid, slots // top_k, 0).to(tl.int64)
    rn = nt * BN + tl.arange(0, BN)
    e64 = e.to(tl.int64)
    wg_rows = w_ptr + e64 * WE + rn[:, None] * WR
    wu_rows = w_ptr + e64 * WE + (Ip + rn)[:, None] * WR
    sg_rows = s_ptr + (e64 * 2 * Ip + rn)[:, None] * NSC
    su_rows = s_ptr + (e64 * 2 * Ip + Ip + rn)[:, None] * NSC
    if SWAP:
        acc_g = tl.zeros((BN, BM), dtype=tl.float32)
        acc_u = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    return rn, x_ptr + tok[:, None] * stride_xm, wg_rows, wu_rows, sg_rows, su_rows, acc_g, acc_u


@triton.jit
def _gemm1_act(acc_g, acc_u, e, rn, gs_ptr, b_ptr, Ip, alpha, beta, limit, FMT: tl.constexpr, ASM: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """GEMM1's epilogue on the whole K sums [BM, BN]: nvfp4's global scale, b13, SwiGLU."""
    if FMT == 1:
        gs = _nvfp4_global_scale(gs_ptr, e, ASM)
        acc_g = acc_g * gs
        acc_u = acc_u * gs
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + e.to(tl.int64) * 2 * Ip + rn)[None, :]
        acc_u += tl.load(b_ptr + e.to(tl.int64) * 2 * Ip + Ip + rn)[None, :]
    return swiglu(acc_g, acc_u, alpha, beta, limit, HAS_LIMIT)  # NaN kept through the clamps


@triton.jit
def _stream_start(p, TU, P):
    """The first of TU work units that program p of P runs: its share is [start(p), start(p + 1))."""
    return p * TU // P


@triton.jit
def _stream_first(unit, TU, P):
    """The program whose share [start(p), start(p + 1)) of TU work units holds `unit`."""
    return ((unit + 1).to(tl.int64) * P + TU - 1) // TU - 1


@triton.jit
def moe_gemm1_kernel(
    x_ptr, stride_xm,                 # [M, H] activations
    w_ptr, s_ptr, gs_ptr, b_ptr,      # w13 [E, 2Ip, Kp/(2PB), PB] u8; scales [E, 2Ip, Kp/G]; gs [E]; b13 [E, 2Ip] f32
    inter_ptr,                        # [NB * BM, Ip] bf16 (sorted, padded rows)
    sorted_ptr, block_expert_ptr,     # [NB * BM] i32 slot ids (-1 = padding); [NB] i32 expert (-1 = no block)
    ids_ptr, MK, E,                   # [M * k] i32 expert ids (DIRECT: the grouping is done here)
    part_ptr, lock_ptr, part_stride,  # SPLIT > 1: fp32 [SPLIT, NB * BM, 2Ip] partial sums; i32 [NB * n_tiles] zeros
    H, Ip, Kp, top_k, NB, n_tiles, WE, WR, WP, NSC,   # WE, WR, WP: w13's expert, row and panel strides (bytes)
    alpha, beta, limit,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr,
    U: tl.constexpr, FOLD: tl.constexpr, DIRECT: tl.constexpr, MKP: tl.constexpr, PDL: tl.constexpr,
    SPLIT: tl.constexpr, WORDS: tl.constexpr, PB: tl.constexpr, WHOLE: tl.constexpr, STREAM: tl.constexpr,
):
    """GEMM1 + SwiGLU: for one block of BM sorted token slots of one expert and BN intermediate
    columns, gather the tokens' rows of x (no permuted copy), multiply by the gate and up rows
    of w13 dequantized in registers, add b13, apply SwiGLU, store bf16 rows of the intermediate.
    Bytes per program: 2 * BN * Kp / 2 weight bytes + scales, BM * H activations (L2-resident).

    SPLIT > 1 (split-K, for few active experts: SPLIT times the programs): the SPLIT programs of
    a tile each reduce 1/SPLIT of K and store their fp32 partial sums (valid rows only); the last
    to finish (a counter per tile, reset to 0 by that program) adds the partials in split order
    (0, 1, ...: the same order whoever finishes last, so the result is deterministic) and runs
    the epilogue. The activation needs the whole sum, so no third launch is needed for it.

    WHOLE (SPLIT 1; Kp / 2G a multiple of U): the unrolled loop takes every chunk, x masked at H
    (KernelConfig.whole_k).

    STREAM (SPLIT 1; KernelConfig.stream_k1): the grid's P programs share the tiles' K loops
    equally (`_gemm1_stream`)."""
    tl.static_assert(U % 2 == 0, "U (k_unroll) must be even: the kernels read K chunks in pairs")
    _pdl_begin(PDL)
    if STREAM:
        _gemm1_stream(x_ptr, stride_xm, w_ptr, s_ptr, gs_ptr, b_ptr, inter_ptr, sorted_ptr, block_expert_ptr, ids_ptr,
                      MK, E, part_ptr, lock_ptr, H, Ip, Kp, top_k, NB, n_tiles, WE, WR, WP, NSC, alpha, beta, limit,
                      FMT, G, HAS_BIAS, HAS_LIMIT, BM, BN, SWAP, CDT, ASM, U, FOLD, DIRECT, MKP, WORDS, PB, WHOLE)
    else:
        pid = tl.program_id(0)
        sk = pid % SPLIT
        tile = pid // SPLIT
        blk = tile // n_tiles
        nt = tile % n_tiles
        e, rm, slots, valid = _block(ids_ptr, MK, E, sorted_ptr, block_expert_ptr, blk, BM, DIRECT, MKP)
        if e < 0:
            return
        rn, x_rows, wg_rows, wu_rows, sg_rows, su_rows, acc_g, acc_u = _gemm1_tile(
            x_ptr, stride_xm, w_ptr, s_ptr, slots, valid, top_k, e, nt, Ip, WE, WR, NSC, BM, BN, SWAP)
        if SPLIT == 1:
            c_lo = 0
            c_hi = Kp // (2 * G)
            if WHOLE:
                c_main = c_hi
            else:
                c_main = (H // (2 * G)) // U * U   # chunks entirely inside x's H columns, in groups of U
        else:
            c_lo, c_hi = _split_chunks(Kp // (2 * G), sk, SPLIT, U)
            c_main = c_lo + (tl.maximum(tl.minimum(c_hi, H // (2 * G)) - c_lo, 0)) // U * U
        acc_g, acc_u = _gemm1_k(acc_g, acc_u, x_rows, valid, H, wg_rows, wu_rows, WP, PB, sg_rows, su_rows, c_lo,
                                c_main, c_hi, BN, FMT, G, CDT, ASM, FOLD, SWAP, U, WORDS, WHOLE)
        if SWAP:
            acc_g = tl.trans(acc_g)
            acc_u = tl.trans(acc_u)
        if SPLIT > 1:  # partial sums out; the tile's last program adds them in split order
            prow = part_ptr + rm.to(tl.int64)[:, None] * (2 * Ip) + rn[None, :]
            pstride = part_stride.to(tl.int64)   # (SPLIT - 1) x the stride can pass 2^31
            tl.store(prow + sk * pstride, acc_g, mask=valid[:, None])
            tl.store(prow + sk * pstride + Ip, acc_u, mask=valid[:, None])
            tl.debug_barrier()             # every thread's partial stored before the count (acq_rel, gpu scope)
            done = tl.atomic_add(lock_ptr + tile, 1)   # programs of this tile finished before this one
            last = (tl.zeros_like(rm) + done) == SPLIT - 1   # [BM] (a tensor: the interpreter's scalars do not mask)
            rd = valid[:, None] & last[:, None]
            acc_g = tl.load(prow, mask=rd, other=0.0, cache_modifier=".cg")
            acc_u = tl.load(prow + Ip, mask=rd, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                acc_g += tl.load(prow + s * pstride, mask=rd, other=0.0, cache_modifier=".cg")
                acc_u += tl.load(prow + s * pstride + Ip, mask=rd, other=0.0, cache_modifier=".cg")
            # the last one takes the count back to 0 (all SPLIT increments are in): ready for the next call
            tl.atomic_add(lock_ptr + tile, tl.where(done == SPLIT - 1, -SPLIT, 0))
        act = _gemm1_act(acc_g, acc_u, e, rn, gs_ptr, b_ptr, Ip, alpha, beta, limit, FMT, ASM, HAS_BIAS, HAS_LIMIT)
        out_ptrs = inter_ptr + rm.to(tl.int64)[:, None] * Ip + rn[None, :]
        if SPLIT > 1:
            tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=last[:, None])
        else:
            tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty))


@triton.jit
def _gemm1_stream(x_ptr, stride_xm, w_ptr, s_ptr, gs_ptr, b_ptr, inter_ptr, sorted_ptr, block_expert_ptr, ids_ptr,
                  MK, E, part_ptr, lock_ptr, H, Ip, Kp, top_k, NB, n_tiles, WE, WR, WP, NSC, alpha, beta, limit,
                  FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr,
                  U: tl.constexpr, FOLD: tl.constexpr, DIRECT: tl.constexpr, MKP: tl.constexpr,
                  WORDS: tl.constexpr, PB: tl.constexpr, WHOLE: tl.constexpr):
    """GEMM1 as stream-K (KernelConfig.stream_k1): every tile's K loop is NU work units (its
    iterations of U chunks inside H, then, if any chunks are left, one unit of the remaining
    pairs; WHOLE: every chunk in iterations of U), the tiles' units are laid end to end (tile =
    block x n_tiles + column tile), and program p of the P in the grid runs units
    [p * TU // P, (p + 1) * TU // P), so every program has the same work to within one unit
    whatever the number of tiles. A program runs a tile's epilogue where it holds all of the
    tile's units; otherwise it stores its fp32 partial sums [BM, 2BN] in its own slot of part
    (2 per program: its first tile's, then its last's) and counts itself in the tile's counter;
    the tile's last contributor adds the slots of all of them in program order (deterministic,
    whoever finishes last), runs the epilogue and sets the counter back to 0. With DIRECT, TU
    counts the live blocks only (the slots' distinct experts, in blocks of BM; else all NB of the
    grouping's); with more programs
    than units, one unit per program and the rest idle."""
    nch = Kp // (2 * G)
    if WHOLE:
        n_main = nch // U
    else:
        n_main = (H // (2 * G)) // U
    NU = n_main + (nch > n_main * U).to(tl.int32)
    if DIRECT:
        n_blocks = _direct_blocks(ids_ptr, MK, E, BM, MKP)
    else:
        n_blocks = NB
    TU = n_blocks.to(tl.int64) * n_tiles * NU
    # P: the programs that share the units, at most one per unit, so none of them is empty; the
    # grid's others (pid >= P) run nothing
    P = tl.maximum(tl.minimum(tl.num_programs(0), TU), 1)
    pid = tl.minimum(tl.program_id(0), P)
    u_lo = _stream_start(pid, TU, P)
    u_hi = _stream_start(tl.minimum(pid + 1, P), TU, P)
    t_first = u_lo // NU
    t_last = (u_hi + NU - 1) // NU          # one past the last tile touched
    for tile in tl.range(t_first, t_last, num_stages=1):
        a = tl.maximum(u_lo, tile * NU) - tile * NU      # this program's units [a, b) of the tile
        b = tl.minimum(u_hi, (tile + 1) * NU) - tile * NU
        blk = (tile // n_tiles).to(tl.int32)
        nt = (tile % n_tiles).to(tl.int32)
        e, rm, slots, valid = _block(ids_ptr, MK, E, sorted_ptr, block_expert_ptr, blk, BM, DIRECT, MKP)
        if (e >= 0) & (b > a):
            rn, x_rows, wg_rows, wu_rows, sg_rows, su_rows, acc_g, acc_u = _gemm1_tile(
                x_ptr, stride_xm, w_ptr, s_ptr, slots, valid, top_k, e, nt, Ip, WE, WR, NSC, BM, BN, SWAP)
            c_lo = (a * U).to(tl.int32)
            c_main = (tl.minimum(b, n_main) * U).to(tl.int32)
            c_hi = tl.where(b > n_main, nch, c_main)
            acc_g, acc_u = _gemm1_k(acc_g, acc_u, x_rows, valid, H, wg_rows, wu_rows, WP, PB, sg_rows, su_rows, c_lo,
                                    c_main, c_hi, BN, FMT, G, CDT, ASM, FOLD, SWAP, U, WORDS, WHOLE)
            if SWAP:
                acc_g = tl.trans(acc_g)
                acc_u = tl.trans(acc_u)
            out_ptrs = inter_ptr + rm.to(tl.int64)[:, None] * Ip + rn[None, :]
            r2 = tl.arange(0, BM)[:, None] * (2 * BN) + tl.arange(0, BN)[None, :]   # a slot's [BM, 2BN] offsets
            if (a == 0) & (b == NU):
                act = _gemm1_act(acc_g, acc_u, e, rn, gs_ptr, b_ptr, Ip, alpha, beta, limit, FMT, ASM, HAS_BIAS,
                                 HAS_LIMIT)
                tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty))
            else:
                mine = part_ptr + (2 * pid + (tile != t_first).to(tl.int64)) * (BM * 2 * BN) + r2
                tl.store(mine, acc_g)
                tl.store(mine + BN, acc_u)
                tl.debug_barrier()             # every thread's partial stored before the count (acq_rel, gpu scope)
                done = tl.atomic_add(lock_ptr + tile, 1)   # contributors of this tile finished before this one
                q0 = _stream_first(tile * NU, TU, P)
                q1 = _stream_first((tile + 1) * NU - 1, TU, P)
                if done == q1 - q0:            # the last: add every contributor's slot in program order
                    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
                    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
                    for q in tl.range(q0, q1 + 1, num_stages=1):
                        first_q = _stream_start(q, TU, P) // NU   # q's first tile: slot 0; any later: slot 1
                        theirs = part_ptr + (2 * q + (tile != first_q).to(tl.int64)) * (BM * 2 * BN) + r2
                        acc_g += tl.load(theirs, cache_modifier=".cg")
                        acc_u += tl.load(theirs + BN, cache_modifier=".cg")
                    tl.atomic_add(lock_ptr + tile, -(q1 - q0 + 1).to(tl.int32))   # back to 0 for the next call
                    act = _gemm1_act(acc_g, acc_u, e, rn, gs_ptr, b_ptr, Ip, alpha, beta, limit, FMT, ASM, HAS_BIAS,
                                     HAS_LIMIT)
                    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty))


@triton.jit
def moe_gemm2_kernel(
    inter_ptr,                        # [NB * BM, Ip] bf16
    w_ptr, s_ptr, gs_ptr, b_ptr,      # w2 [E, Hp, Ip/(2PB), PB] u8; scales [E, Hp, Ip/G]; gs [E] f32; b2 [E, Hp] f32
    y_ptr,                            # [SPLIT, M * top_k, H] per-slot outputs (fp32; bf16: KernelConfig.y_bf16)
    sorted_ptr, block_expert_ptr, topk_w_ptr,   # topk_weights flat [M * top_k] f32
    ids_ptr, MK, E,                   # [M * k] i32 expert ids (DIRECT: the grouping is done here)
    H, Hp, Ip, n_tiles, WE, WR, WP, NSC, y_split_stride,   # WE, WR, WP: w2's strides (bytes), as GEMM1's
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, CDT: tl.constexpr, ASM: tl.constexpr,
    U: tl.constexpr, FOLD: tl.constexpr, SPLIT: tl.constexpr, DIRECT: tl.constexpr, MKP: tl.constexpr,
    PDL: tl.constexpr, WORDS: tl.constexpr, PB: tl.constexpr,
):
    """GEMM2: one block of BM intermediate rows (one expert) times BN rows of w2, plus b2,
    times each slot's routing weight, stored to that slot's row of y (combined later in a
    fixed order, so the result is deterministic). With SPLIT > 1, SPLIT programs share a tile,
    each over 1/SPLIT of K (split-K, for few active experts: SPLIT times the programs); split 0
    adds the bias, and each writes its own copy of y (y_split_stride elements apart)."""
    tl.static_assert(U % 2 == 0, "U (k_unroll) must be even: the kernels read K chunks in pairs")
    pid = tl.program_id(0)
    sk = pid % SPLIT
    blk = pid // SPLIT // n_tiles
    nt = pid // SPLIT % n_tiles
    _pdl_begin(PDL)
    e, rm, slots, valid = _block(ids_ptr, MK, E, sorted_ptr, block_expert_ptr, blk, BM, DIRECT, MKP)
    if (e < 0) | (nt * BN >= H):   # no block, or a tile of padding columns only (gpt-oss: 2880 of 2944)
        return
    e64 = e.to(tl.int64)
    rn = nt * BN + tl.arange(0, BN)
    w_rows = w_ptr + e64 * WE + rn[:, None] * WR
    s_rows = s_ptr + (e64 * Hp + rn)[:, None] * NSC
    a_rows = inter_ptr + rm.to(tl.int64)[:, None] * Ip
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    if SPLIT == 1:   # the intermediate has all Ip columns: no masks
        c_lo = 0
        c_hi = Ip // (2 * G)
        c_main = c_hi // U * U
    else:
        c_lo, c_hi = _split_chunks(Ip // (2 * G), sk, SPLIT, U)
        c_main = c_lo + tl.maximum(c_hi - c_lo, 0) // U * U
    for c0 in range(c_lo, c_main, U):
        sc = _group_scales(s_rows, c0, U, FMT, WORDS)
        for u in tl.static_range(0, U, 2):
            acc = _gemm2_pair(acc, a_rows, valid, w_rows, WP, PB, sc[2 * u:2 * u + 4], c0 + u, BN, FMT, G, CDT, ASM,
                              FOLD, SWAP)
    for c in tl.range(c_main, c_hi, 2, num_stages=1):
        acc = _gemm2_pair(acc, a_rows, valid, w_rows, WP, PB, _group_scales(s_rows, c, 2, FMT, WORDS), c, BN, FMT,
                          G, CDT, ASM, FOLD, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    if FMT == 1:
        acc = acc * _nvfp4_global_scale(gs_ptr, e, ASM)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e64 * Hp + rn, mask=(tl.zeros_like(rn) + sk) == 0, other=0.0)[None, :]
    wt = tl.load(topk_w_ptr + tl.where(valid, slots, 0), mask=valid, other=0.0)
    acc = acc * wt[:, None]
    slot64 = tl.where(valid, slots, 0).to(tl.int64)
    if SPLIT > 1:
        y_ptr += sk.to(tl.int64) * y_split_stride   # (SPLIT - 1) x the stride can pass 2^31
    tl.store(y_ptr + slot64[:, None] * H + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (rn < H)[None, :])


@triton.jit
def moe_combine_kernel(
    y_ptr, ids_ptr, shared_ptr, out_ptr,  # y [SPLIT, M * k, H]; ids [M, k] i32; shared [M, H] or dummy; out [M, H]
    H, top_k, E, y_split_stride,
    HAS_SHARED: tl.constexpr, K_P2: tl.constexpr, BH: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """out[t] = sum over splits s, then slots j with an expert, of y[s, t * k + j] (fixed
    order: deterministic) (+ shared_output[t]), in out's dtype. Every element of out is written.
    A token naming an id outside [-1, E) gets a NaN row (grouping ignored the slot): bad ids are
    visible in the output, never a read or write out of bounds, and cost no host sync."""
    t = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = rh < H
    rj = tl.arange(0, K_P2)
    _pdl_begin(PDL)
    ids = tl.load(ids_ptr + t * top_k + rj, mask=rj < top_k, other=-1)
    use = (ids >= 0) & (ids < E)
    bad = tl.sum(((ids < -1) | (ids >= E)).to(tl.int32), axis=0) > 0
    y = tl.load(y_ptr + (t * top_k + rj)[:, None] * H + rh[None, :], mask=use[:, None] & hm[None, :], other=0.0)
    for s in tl.static_range(1, SPLIT):
        y += tl.load(y_ptr + y_split_stride.to(tl.int64) * s + (t * top_k + rj)[:, None] * H + rh[None, :],
                     mask=use[:, None] & hm[None, :], other=0.0)
    acc = tl.sum(y.to(tl.float32), axis=0)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t * H + rh, mask=hm, other=0.0).to(tl.float32)
    acc = tl.where(bad, float("nan"), acc)
    tl.store(out_ptr + t * H + rh, acc.to(out_ptr.dtype.element_ty), mask=hm)


# ---- token grouping -----------------------------------------------------------------------
# Slots (t * k + j) are sorted by expert into blocks of BM rows, each expert padded to a
# multiple of BM with -1. The row a slot gets inside its expert comes from atomic_add's
# return value, so it can differ between runs; every row is computed independently and the
# combine sums by slot index, so the output does not depend on it (bitwise).

@triton.jit
def _rank_slots(ids_ptr, counts_ptr, rank_ptr, MK, E, start, CH: tl.constexpr):
    rs = start + tl.arange(0, CH)
    ids = tl.load(ids_ptr + rs, mask=rs < MK, other=-1)
    ok = (ids >= 0) & (ids < E)  # -1: no expert; >= E or < -1: a bad id (the combine poisons its row)
    r = tl.atomic_add(counts_ptr + tl.where(ok, ids, 0), 1, mask=ok)
    tl.store(rank_ptr + rs, r, mask=ok)


@triton.jit
def _block_experts(first, nblk, nreal, out_ptr, n, FT: tl.constexpr):
    """out_ptr[b] for b < n: the expert of block b, given each expert's first block and block
    count ([E_P2] each, lane e = expert e, 0 blocks past E; an expert's blocks are contiguous):
    each expert writes its id into its blocks, one block of every expert per step (as many steps
    as the largest expert has blocks); -1 from block nreal on."""
    e = tl.arange(0, first.shape[0])
    for j in range(0, tl.max(nblk, axis=0)):
        tl.store(out_ptr + first + j, e, mask=j < nblk)
    for b0 in range(nreal, n, FT):
        rb = b0 + tl.arange(0, FT)
        tl.store(out_ptr + rb, tl.full((FT,), -1, dtype=tl.int32), mask=rb < n)


@triton.jit
def _expert_starts(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, E, NB,
                   BM: tl.constexpr, E_P2: tl.constexpr, FT: tl.constexpr,
                   TM: tl.constexpr, split_ptr, NT):
    """Padded start row of each expert; the expert of every block; -1 in every sorted row.

    TM > 0 (tail blocks): an expert whose last rows fit in TM rows (count % BM in 1..TM) puts them
    in a tail block of TM rows instead of a padded block of BM; the NT tail blocks (at most one
    per expert) follow the NB blocks of BM rows, in expert order. split_ptr[e] then holds expert
    e's rows in blocks of BM (its first slots); starts_ptr[E + e] the start row of its tail block."""
    re = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + re, mask=re < E, other=0, cache_modifier=".cg")
    r = cnt % BM
    tail = (r > 0) & (r <= TM)   # never when TM == 0
    padded = (cnt - tl.where(tail, r, 0) + BM - 1) // BM * BM
    end = tl.cumsum(padded, axis=0)
    tl.store(starts_ptr + re, end - padded, mask=re < E)
    _block_experts((end - padded) // BM, padded // BM, tl.sum(padded, axis=0) // BM, block_expert_ptr, NB, FT)
    rows = NB * BM
    if TM > 0:
        t = tail.to(tl.int32)
        tend = tl.cumsum(t, axis=0)
        tl.store(split_ptr + re, padded, mask=re < E)
        tl.store(starts_ptr + E + re, NB * BM + (tend - t) * TM, mask=re < E)
        _block_experts(tend - t, t, tl.sum(t, axis=0), block_expert_ptr + NB, NT, FT)
        rows += NT * TM
    for p0 in range(0, rows, FT):
        rp = p0 + tl.arange(0, FT)
        tl.store(sorted_ptr + rp, tl.full((FT,), -1, dtype=tl.int32), mask=rp < rows)


@triton.jit
def _place_slots(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, MK, E, start, CH: tl.constexpr,
                 TM: tl.constexpr, split_ptr):
    rs = start + tl.arange(0, CH)
    ids = tl.load(ids_ptr + rs, mask=rs < MK, other=-1)
    ok = (ids >= 0) & (ids < E)
    e = tl.where(ok, ids, 0)
    r = tl.load(rank_ptr + rs, mask=ok, other=0)
    st = tl.load(starts_ptr + e, mask=ok, other=0, cache_modifier=".cg")
    if TM > 0:   # ranks past the expert's blocks of BM go to its tail block
        full = tl.load(split_ptr + e, mask=ok, other=0, cache_modifier=".cg")
        tst = tl.load(starts_ptr + E + e, mask=ok, other=0, cache_modifier=".cg")
        st = tl.where(r < full, st, tst - full)
    tl.store(sorted_ptr + st + r, rs, mask=ok)


@triton.jit
def moe_group_small_kernel(ids_ptr, counts_ptr, starts_ptr, rank_ptr, sorted_ptr, block_expert_ptr, split_ptr,
                           MK, E, NB, NT, BM: tl.constexpr, CH: tl.constexpr, E_P2: tl.constexpr,
                           FT: tl.constexpr, TM: tl.constexpr, PDL: tl.constexpr):
    """All of the grouping in one program (M * k <= CH): for decode, one launch."""
    _pdl_begin(PDL)
    re = tl.arange(0, E_P2)
    tl.store(counts_ptr + re, tl.zeros((E_P2,), dtype=tl.int32), mask=re < E)
    tl.debug_barrier()
    _rank_slots(ids_ptr, counts_ptr, rank_ptr, MK, E, 0, CH)
    tl.debug_barrier()
    _expert_starts(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, E, NB, BM, E_P2, FT, TM, split_ptr, NT)
    tl.debug_barrier()
    _place_slots(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, MK, E, 0, CH, TM, split_ptr)


@triton.jit
def moe_rank_kernel(ids_ptr, counts_ptr, rank_ptr, MK, E, CH: tl.constexpr):
    _rank_slots(ids_ptr, counts_ptr, rank_ptr, MK, E, tl.program_id(0) * CH, CH)


@triton.jit
def moe_starts_kernel(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, split_ptr, E, NB, NT,
                      BM: tl.constexpr, E_P2: tl.constexpr, FT: tl.constexpr, TM: tl.constexpr):
    _expert_starts(counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, E, NB, BM, E_P2, FT, TM, split_ptr, NT)


@triton.jit
def moe_place_kernel(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, split_ptr, MK, E, CH: tl.constexpr,
                     TM: tl.constexpr):
    _place_slots(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, MK, E, tl.program_id(0) * CH, CH, TM, split_ptr)
