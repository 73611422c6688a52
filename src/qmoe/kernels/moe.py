"""qmoe's Triton MoE kernels: the public entry points (no policy, no I/O here).

    layout = MoEKernelWeights.from_canonical(...)        # once (kernels/layout.py)
    group_tokens(topk_ids, E, BM) -> Grouping            # GPU-side, no host sync
    fused_moe(x, topk_ids, topk_weights, layout, act, cfg, out, shared_output)

Work split: token grouping (sort the M*k (token, expert) slots by expert into blocks of BM
rows), GEMM1 (gather x rows, dequantize w13 in registers, + b13, SwiGLU -> bf16
intermediate), GEMM2 (dequantize w2, + b2, x routing weight -> one row per slot), combine
(sum each token's k rows in a fixed order, + shared_output -> out). Every size is an upper
bound computed from M, so nothing waits for the GPU and the whole call is CUDA-graph
capturable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import _moe_kernels as K
from . import interpreted, sm_count
from .layout import (E2M1_WORD_BITS, INT4_WORD_BITS, from_kernel_layout, nvfp4_codes_problem, nvfp4_scale_codes,
                     nvfp4_scales_of_codes, round_up, to_kernel_layout)

FORMAT_CODES = {"mxfp4": K.FMT_MXFP4, "nvfp4": K.FMT_NVFP4, "int4": K.FMT_INT4}
FORMAT_BLOCKS = {"mxfp4": 32, "nvfp4": 16, "int4": 32}
WORD_BITS = {"mxfp4": E2M1_WORD_BITS, "nvfp4": E2M1_WORD_BITS, "int4": INT4_WORD_BITS}
"""How each format's codes sit inside 4-byte words of the kernel layout (kernels/layout.py)."""
MXFP4_FOLD_MAX = 128
"""Largest E8M0 scale byte whose scale x 2^126 is a finite bf16: matrices whose scales all stay
at or below it (|scale| <= 2) run the decode with one multiply per pair instead of two."""
SMALL_GROUPING_MAX = 256
"""Up to this many (token, expert) slots, grouping runs as one Triton program (one launch,
for decode); above it, as three small kernels (rank, expert starts, placement)."""
DIRECT_MAX_SLOTS = 128
"""Up to this many (token, expert) slots a configuration may group inside the GEMMs (direct=True):
no grouping launch; each GEMM program finds its block from the ids (O(slots^2) integer work)."""


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration of one MoE call.

    block_m: sorted token rows per program (16..128; 8 with swap, where the token rows are
    mma.sync's 8-column N side: half the MMAs and activation loads of 16 rows); block_n1 /
    block_n2: output columns per program in GEMM1 (intermediate) / GEMM2 (hidden); swap:
    weights as the MMA's first operand (accumulator transposed); k_unroll: K chunks per loop
    iteration (loads in flight; even: the kernels read chunks in pairs);
    warps/stages per GEMM; split_k: GEMM2 as this many K parts per tile (partial sums added in
    the combine, in a fixed order); split_k1: GEMM1 as this many K parts per tile (the tile's
    last program adds the fp32 partial sums in split order, then runs the SwiGLU epilogue);
    scale_words: load the scales as 32-bit words (two K chunks of one-byte scales) and, where
    the scale rows are 8-byte aligned, 64-bit ones (four chunks of one-byte scales, two of
    int4's bf16; int4 needs them), which Triton stages through shared memory with the weights;
    one-byte scale loads are not pipelined;
    direct: group the slots inside the GEMMs (no grouping launch; used when M * k <=
    DIRECT_MAX_SLOTS, else the grouping kernels run); pdl: launch each kernel with
    programmatic dependent launch (it starts while the previous one finishes and waits on the
    device for its results; GPU only, ignored by the interpreter);
    tail_m: 0, or tail blocks of this many rows (a power of two, 16 <= tail_m < block_m): an
    expert whose last count % block_m rows fit in tail_m rows runs them in a tail block (a second
    GEMM1 and GEMM2 launch with block_m = tail_m) instead of a block of block_m rows that is
    mostly padding (Grouping). Which of an expert's slots land in the tail block can change
    between runs (the grouping ranks slots with atomics), so tail_m needs blocks whose rows get
    the same bits at block_m and tail_m rows: the weight first (swap; the token rows are the MMA's
    N side, which never changes the instruction: docs/performance.md sessions 9 and 10) or
    block_m <= 32 (mma.sync at both sizes). Not
    with split_k1 (the tail blocks are for prefill); unused with direct grouping;
    whole_k: GEMM1's unrolled loop takes every chunk of the padded K, x masked at H, so no
    remainder loop runs after it (that loop is not pipelined: its loads' latency is exposed once
    per program, where H is no multiple of 2G x k_unroll, as gpt-oss's 2880); needs the padded K's
    chunks in whole groups of k_unroll (problem_with), not with split_k1;
    y_bf16: GEMM2 stores each slot's output row (y, [M * k, H]) in bf16 rather than fp32, which
    halves the bytes GEMM2 writes and the combine reads (M * k * H * 2 each: 0.5 GB at
    qwen3-30b-a3b M = 8192), at the price of one bf16 rounding of each slot's row before the
    combine's fp32 sum (as the peers' per-slot outputs); not with split_k (each partial sum would
    be rounded);
    stream_k1: 0, or GEMM1 as stream-K on stream_k1 programs per SM (1..4): the tiles' K loops are
    cut into work units (iterations of k_unroll chunks) laid end to end, and each program runs an
    equal share of them, so that no multiprocessor gets more work than another where the tiles do
    not divide evenly among them (gpt-oss-120b M = 1: 184 tiles on 132 SMs); a tile split between
    programs is summed by its last contributor in program order (deterministic; the K cuts depend
    on the number of tiles, so not batch-invariant). Not with split_k1 or tail_m.
    """

    block_m: int = 16
    block_n1: int = 64
    block_n2: int = 64
    swap: bool = False
    num_warps: int = 4
    num_stages: int = 3
    k_unroll: int = 4
    split_k: int = 1
    direct: bool = False
    pdl: bool = False
    split_k1: int = 1
    scale_words: bool = False
    tail_m: int = 0
    whole_k: bool = False
    y_bf16: bool = False
    stream_k1: int = 0

    def __post_init__(self):
        for f in ("block_m", "block_n1", "block_n2"):
            v = getattr(self, f)
            low = 8 if f == "block_m" else 16
            if v < low or v & (v - 1):
                raise ValueError(f"KernelConfig.{f}: expected a power of two >= {low}, got {v}")
        if self.block_m < 16 and not self.swap:
            raise ValueError(f"KernelConfig.block_m={self.block_m} needs swap=True: with the weight second the "
                             f"token rows are the MMA's M side, which is 16 rows (mma.sync) whatever the block")
        if self.k_unroll not in (2, 4, 8):
            raise ValueError(f"KernelConfig.k_unroll: expected 2, 4 or 8 (the kernels read K chunks in pairs: "
                             f"kernels/layout.py), got {self.k_unroll}")
        for f in ("split_k", "split_k1"):
            if getattr(self, f) not in (1, 2, 4):
                raise ValueError(f"KernelConfig.{f}: expected 1, 2 or 4, got {getattr(self, f)}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps: expected 1, 2, 4, 8 or 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"KernelConfig.num_stages: expected 1..8, got {self.num_stages}")
        t = self.tail_m
        if _tail_problem(t, self.block_m):
            raise ValueError(f"KernelConfig.tail_m: {_tail_problem(t, self.block_m)}")
        if t and not (self.swap or self.block_m <= 32):
            raise ValueError(f"KernelConfig.tail_m={t} with block_m={self.block_m} and the weight second: a slot's "
                             f"bits could depend on whether it lands in a tail block (its full blocks may run wgmma, "
                             f"a tail of fewer rows mma.sync); use swap=True or block_m <= 32")
        if self.whole_k and self.split_k1 > 1:
            raise ValueError(f"KernelConfig.whole_k: not with split_k1={self.split_k1} (a split's chunks end where "
                             f"its part of K does)")
        if self.y_bf16 and self.split_k > 1:
            raise ValueError(f"KernelConfig.y_bf16: not with split_k={self.split_k} (each partial sum would be rounded "
                             f"to bf16 before they are added)")
        if not 0 <= self.stream_k1 <= 4:
            raise ValueError(f"KernelConfig.stream_k1: expected 0 (off) or 1..4 programs per SM, got {self.stream_k1}")
        if self.stream_k1 and (self.split_k1 > 1 or t):
            raise ValueError(f"KernelConfig.stream_k1: not with split_k1={self.split_k1} or tail_m={t} (stream-K "
                             f"already cuts GEMM1's K; tail blocks are for prefill)")
        if t and self.split_k1 > 1:
            raise ValueError(f"KernelConfig.tail_m={t}: not with split_k1={self.split_k1} (tail blocks are for "
                             f"prefill, split-K for few tokens)")

    def problem_with(self, fmt: str, hidden_padded: int, intermediate_padded: int) -> str | None:
        """Why this configuration cannot run weights of `fmt` padded to (Hp, Ip), or None (every
        configuration runs every format since session 9; `fmt` sizes whole_k's K chunks).

        GEMM1 runs Ip / block_n1 column tiles and GEMM2 Hp / block_n2: a block that does not
        divide the padded size would leave output columns unwritten. whole_k needs GEMM1's K
        chunks (2G elements of the padded hidden size) in whole loop iterations."""
        if intermediate_padded % self.block_n1:
            return f"block_n1={self.block_n1} does not divide the padded intermediate size {intermediate_padded}"
        if hidden_padded % self.block_n2:
            return f"block_n2={self.block_n2} does not divide the padded hidden size {hidden_padded}"
        if self.whole_k:
            return self.whole_k_problem(fmt, hidden_padded)
        return None

    def whole_k_problem(self, fmt: str, hidden_padded: int) -> str | None:
        """Why whole_k cannot run GEMM1 over a padded hidden size of `fmt`, or None: the unrolled
        loop takes k_unroll K chunks (2G elements each) at a time, so their number must divide."""
        chunks = hidden_padded // (2 * FORMAT_BLOCKS.get(fmt, 32))
        if chunks % self.k_unroll:
            return (f"whole_k: the padded hidden size {hidden_padded} is {chunks} K chunks of {fmt}, no whole number "
                    f"of k_unroll={self.k_unroll}")
        return None


@dataclass(eq=False)
class MoEKernelWeights:
    """Expert weights in the kernel layout (see kernels/layout.py).

    w13: [E, 2Ip, Hp/(2P), P] uint8; s13: [E, 2Ip, Hp/G] uint8 | int16; w2: [E, Hp, Ip/(2P), P]
    uint8 (P = layout.PANEL bytes; views of storage in panel order, though any strides with
    contiguous panels run); s2: [E, Hp, Ip/G] (s13 and s2 are views whose rows are padded to 8
    bytes: kernels/layout.py);
    gs13, gs2: [E] fp32 (nvfp4 global scales, else None); b13: [E, 2Ip] fp32 or None;
    b2: [E, Hp] fp32 or None. H, I: logical sizes.
    fold13 / fold2: the matrix's scales take the short decode: mxfp4, one multiply per pair
    (MXFP4_FOLD_MAX); nvfp4, the scales are stored as codes (layout.nvfp4_scale_codes: one integer
    instruction each instead of about ten; used where layout.nvfp4_codes_problem finds none);
    always True for int4. notes: why a matrix takes the longer decode (empty when neither does).
    counters: filled by `split_counters`, not by callers.
    """

    fmt: str
    H: int
    I: int
    w13: torch.Tensor
    s13: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor
    gs13: torch.Tensor | None = None
    gs2: torch.Tensor | None = None
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    fold13: bool = True
    fold2: bool = True
    notes: list = field(default_factory=list)
    counters: list = field(default_factory=list, repr=False)
    """GEMM1's split-K counters for calls on these weights (`split_counters`)."""

    def __post_init__(self):
        pair = 2 * FORMAT_BLOCKS.get(self.fmt, 32)   # bytes of a chunk pair, which the kernels read at once
        for name in ("w13", "w2"):
            w = getattr(self, name)
            if w.dim() != 4 or w.stride(3) != 1:
                raise ValueError(f"{name}: expected the kernel layout's [E, N, K/(2P), P] with contiguous panels "
                                 f"(kernels/layout.py), got shape {tuple(w.shape)} strides {tuple(w.stride())}")
            pb = w.shape[3]
            if pb % pair or pb & (pb - 1):
                raise ValueError(f"{name}: panels of {pb} bytes: expected a power of two and a multiple of {pair}")

    @functools.cached_property
    def scale_row_align(self) -> int:
        """The largest of 8, 4, 2, 1 bytes that every row of s13 and s2 starts on a multiple of
        (KernelConfig.scale_words reads them as 32- or 64-bit words); checked once per set of
        weights, not per call. kernels/layout.py pads each scale row to 8 bytes, which makes it 8.
        The kernels read element (e, n, j) at e * stride(0) + n * stride(1) + j: rows may be
        padded, but each row's scales must be contiguous and the experts evenly spaced."""
        align = 8
        for s in (self.s13, self.s2):
            if s.stride(2) != 1 or s.stride(0) != s.shape[1] * s.stride(1):
                raise ValueError(f"scales of strides {tuple(s.stride())} for shape {tuple(s.shape)}: the kernels "
                                 f"need contiguous rows and experts spaced by shape[1] rows")
            while align > 1 and (s.stride(1) * s.element_size() % align or s.data_ptr() % align):
                align //= 2
        return align

    def scale_words_level(self) -> tuple[int, str | None]:
        """(the kernels' WORDS: 2 = 64-bit scale loads as well, 1 = 32-bit ones only, 0 = none; why
        not 2, or None): int4's bf16 scales of two chunks are 8 bytes, so int4 needs 8-byte rows."""
        need = 8 if self.fmt == "int4" else 4
        if self.scale_row_align < need:
            return 0, f"the scale rows are not {need}-byte aligned"
        return (2 if self.scale_row_align >= 8 else 1), None

    @property
    def E(self) -> int:
        return self.w13.shape[0]

    @property
    def Hp(self) -> int:
        return self.w2.shape[1]

    @property
    def Ip(self) -> int:
        return self.w13.shape[1] // 2

    @classmethod
    def from_canonical(cls, fmt: str, w13_data, w13_scales, w2_data, w2_scales,
                       w13_global=None, w2_global=None, b13=None, b2=None) -> "MoEKernelWeights":
        """Canonical tensors (qmoe.weights layout) -> kernel layout.

        w13_data [E, 2I, H/2] uint8, w13_scales [E, 2I, H/G]; w2_data [E, H, I/2], w2_scales
        [E, H, I/G]; w13_global / w2_global [E] fp32 (nvfp4); b13 [E, 2I] / b2 [E, H] fp32 or None.
        """
        if fmt not in FORMAT_CODES:
            raise ValueError(f"fmt: expected one of {', '.join(FORMAT_CODES)}, got {fmt!r}")
        G = FORMAT_BLOCKS[fmt]
        E, two_i, H2 = w13_data.shape
        H, I = 2 * H2, two_i // 2
        Hp, Ip = round_up(H, 128), round_up(I, 128)
        w13, s13 = to_kernel_layout(w13_data, w13_scales, G, halves=2, word_bits=WORD_BITS[fmt])
        w2, s2 = to_kernel_layout(w2_data, w2_scales, G, halves=1, word_bits=WORD_BITS[fmt])
        pb13 = pb2 = None
        if b13 is not None:
            pb13 = torch.zeros(E, 2 * Ip, dtype=torch.float32, device=b13.device)
            pb13[:, :I] = b13[:, :I]
            pb13[:, Ip:Ip + I] = b13[:, I:]
        if b2 is not None:
            pb2 = torch.zeros(E, Hp, dtype=torch.float32, device=b2.device)
            pb2[:, :H] = b2
        f32 = (lambda t: None if t is None else t.float().contiguous())
        if fmt == "nvfp4":   # scales as codes where that is exact (kernels/layout.py)
            why13, why2 = nvfp4_codes_problem(w13_data, w13_scales), nvfp4_codes_problem(w2_data, w2_scales)
            fold13, fold2 = why13 is None, why2 is None
            s13 = nvfp4_scale_codes(s13) if fold13 else s13
            s2 = nvfp4_scale_codes(s2) if fold2 else s2
            notes = [f"{name}: raw E4M3 scales (the longer decode): {why}"
                     for name, why in (("w13", why13), ("w2", why2)) if why is not None]
        else:   # mxfp4: the largest E8M0 byte of each matrix decides (int4 always folds)
            top13, top2 = (int(sc.max()) if fmt == "mxfp4" and sc.numel() else 0 for sc in (s13, s2))
            fold13, fold2 = top13 <= MXFP4_FOLD_MAX, top2 <= MXFP4_FOLD_MAX
            notes = [f"{name}: E8M0 scales above 2 (byte {top} > {MXFP4_FOLD_MAX}): two multiplies per pair"
                     for name, top in (("w13", top13), ("w2", top2)) if top > MXFP4_FOLD_MAX]
        return cls(fmt, H, I, w13, s13, w2, s2, f32(w13_global), f32(w2_global), pb13, pb2, fold13, fold2, notes)

    def to_canonical(self, scale_dtype: torch.dtype):
        """Inverse of `from_canonical`: (w13_data, w13_scales, w2_data, w2_scales, b13, b2)."""
        G = FORMAT_BLOCKS[self.fmt]
        H, I, Ip = self.H, self.I, self.Ip
        wb = WORD_BITS[self.fmt]
        raw = (lambda sc, fold: nvfp4_scales_of_codes(sc) if self.fmt == "nvfp4" and fold else sc)
        w13, s13 = from_kernel_layout(self.w13, raw(self.s13, self.fold13), 2 * I, H, G, scale_dtype, halves=2,
                                      word_bits=wb)
        w2, s2 = from_kernel_layout(self.w2, raw(self.s2, self.fold2), H, I, G, scale_dtype, halves=1, word_bits=wb)
        b13 = None if self.b13 is None else torch.cat((self.b13[:, :I], self.b13[:, Ip:Ip + I]), dim=1)
        b2 = None if self.b2 is None else self.b2[:, :H].contiguous()
        return w13, s13, w2, s2, b13, b2

    @property
    def nbytes(self) -> int:
        """Bytes the weights hold on the device, the scales' row padding included."""
        ts = (self.w13, self.s13, self.w2, self.s2, self.gs13, self.gs2, self.b13, self.b2)
        return sum(t.shape[0] * t.stride(0) * t.element_size() for t in ts if t is not None)


def _tail_problem(tail_m: int, block_m: int) -> str | None:
    """Why tail_m is no tail-block size under blocks of block_m rows, or None (0: no tail blocks)."""
    if tail_m and (tail_m < 16 or tail_m & (tail_m - 1) or tail_m >= block_m):
        why = " (tail blocks need block_m >= 32)" if block_m <= 16 else ""
        return f"expected 0 or a power of two in [16, block_m={block_m}), got {tail_m}{why}"
    return None


@dataclass
class Grouping:
    """Slots sorted by expert in blocks of `block_m` rows, then (tail_m > 0) tail blocks.

    sorted_slots: [num_blocks * block_m + num_tail_blocks * tail_m] int32, slot index t*k + j,
    or -1 for padding; block_expert: [num_blocks + num_tail_blocks] int32, the expert of each
    block, -1 past the last real block of each part. num_blocks is an upper bound from M alone:
    M*k // block_m + min(E, M*k); num_tail_blocks = min(E, M*k) when tail_m > 0, else 0.
    With tail_m, an expert whose count % block_m is 1..tail_m puts those last rows in one tail
    block of tail_m rows (after all the blocks of block_m rows), not in a padded block of block_m.
    """

    sorted_slots: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    tail_m: int = 0
    num_blocks: int = -1

    def __post_init__(self):
        if self.num_blocks < 0:
            self.num_blocks = self.block_expert.shape[0]

    @property
    def num_tail_blocks(self) -> int:
        return self.block_expert.shape[0] - self.num_blocks

    def parts(self):
        """[(rows per block R, sorted_slots view [blocks * R] int32, block_expert view [blocks]
        int32, blocks)]: the blocks of block_m rows, then the tail blocks if any; the views are
        what one GEMM launch reads."""
        rows = self.num_blocks * self.block_m
        out = [(self.block_m, self.sorted_slots[:rows], self.block_expert[:self.num_blocks], self.num_blocks)]
        if self.num_tail_blocks:
            out.append((self.tail_m, self.sorted_slots[rows:], self.block_expert[self.num_blocks:],
                        self.num_tail_blocks))
        return out


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / block_m) over any routing of num_slots slots."""
    return num_slots // block_m + min(num_experts, num_slots)


def group_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int, pdl: bool = False,
                 tail_m: int = 0) -> Grouping:
    """Sort (token, expert) slots by expert, each expert padded to a multiple of block_m rows;
    with tail_m (a power of two below block_m), an expert's last count % block_m rows go to a
    tail block of tail_m rows instead where they fit in it (Grouping).

    topk_ids: [M, k] int32; -1 (no expert) and ids outside [0, E) are dropped (never read
    or written out of bounds).
    One Triton program for up to SMALL_GROUPING_MAX slots, else three small kernels.
    pdl: launch the one-program grouping with programmatic dependent launch (GPU only).
    """
    if _tail_problem(tail_m, block_m):
        raise ValueError(f"tail_m: {_tail_problem(tail_m, block_m)}")
    MK = topk_ids.numel()
    E = num_experts
    NB = max_blocks(MK, E, block_m)
    NT = min(E, MK) if tail_m else 0
    dev = topk_ids.device
    sorted_slots = torch.empty(NB * block_m + NT * tail_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(NB + NT, dtype=torch.int32, device=dev)
    ids = topk_ids.reshape(-1)
    e_p2 = max(16, triton.next_power_of_2(E))
    # counts [E], starts [2E] (blocks of block_m, then tail blocks), split [E] (rows in blocks of block_m)
    if MK <= SMALL_GROUPING_MAX:
        scratch = torch.empty(4 * E + MK, dtype=torch.int32, device=dev)
        counts, starts, split, rank = scratch[:E], scratch[E:3 * E], scratch[3 * E:4 * E], scratch[4 * E:]
        K.moe_group_small_kernel[(1,)](
            ids, counts, starts, rank, sorted_slots, block_expert, split, MK, E, NB, NT,
            BM=block_m, CH=max(16, triton.next_power_of_2(MK)), E_P2=e_p2, FT=1024, TM=tail_m, PDL=pdl,
            num_warps=4, **({"launch_pdl": True} if pdl else {}))
        return Grouping(sorted_slots, block_expert, block_m, tail_m, NB)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    starts = torch.empty(3 * E, dtype=torch.int32, device=dev)
    starts, split = starts[:2 * E], starts[2 * E:]
    rank = torch.empty(MK, dtype=torch.int32, device=dev)
    ch = 1024
    K.moe_rank_kernel[(triton.cdiv(MK, ch),)](ids, counts, rank, MK, E, CH=ch, num_warps=4)
    K.moe_starts_kernel[(1,)](counts, starts, block_expert, sorted_slots, split, E, NB, NT,
                              BM=block_m, E_P2=e_p2, FT=4096, TM=tail_m, num_warps=8)
    K.moe_place_kernel[(triton.cdiv(MK, ch),)](ids, rank, starts, sorted_slots, split, MK, E, CH=ch, TM=tail_m,
                                               num_warps=4)
    return Grouping(sorted_slots, block_expert, block_m, tail_m, NB)


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              weights: MoEKernelWeights, alpha: float, beta: float, limit: float | None,
              cfg: KernelConfig, out: torch.Tensor, shared_output: torch.Tensor | None = None,
              stats: dict | None = None) -> torch.Tensor:
    """The MoE experts on the Triton kernels.

    x: [M, H] bf16 / fp16 / fp32 (contiguous rows); topk_ids: [M, k] int32 in [-1, E) (a
    token with any other id gets a NaN row: nothing is read or written out of bounds);
    topk_weights: [M, k] fp32; weights: MoEKernelWeights; alpha, beta, limit: SwiGLU
    (limit None = no clamp); out: [M, H] written in place (every element); shared_output:
    [M, H] or None, added in the combine; stats: a dict to receive the compiled GEMM kernels'
    registers / spills / shared memory (diagnostics). Returns out.
    """
    M, H = x.shape
    k = topk_ids.shape[1]
    if M == 0:
        return out
    E, Ip, Hp = weights.E, weights.Ip, weights.Hp
    fmt, G = FORMAT_CODES[weights.fmt], FORMAT_BLOCKS[weights.fmt]
    interp = interpreted()
    cdt = tl.float32 if interp else tl.bfloat16
    BM = cfg.block_m
    bad = cfg.problem_with(weights.fmt, Hp, Ip)
    if bad is not None:
        raise ValueError(f"cfg: {cfg} cannot run here: {bad}")
    has_bias1, has_bias2 = weights.b13 is not None, weights.b2 is not None
    dummy = weights.w13  # for absent optional pointers (never read)
    MK = M * k
    pdl = cfg.pdl and not interp
    launch = {"launch_pdl": True} if pdl else {}
    direct = cfg.direct and MK <= DIRECT_MAX_SLOTS
    ids = topk_ids.reshape(-1)
    words, why = weights.scale_words_level()   # also checks the scales' strides (raises if unreadable)
    if not cfg.scale_words:
        words = 0
    elif why:
        raise ValueError(f"cfg.scale_words: {why} (kernels/layout.py pads each scale row to 8 bytes, which makes "
                         f"them so)")
    if direct:  # the GEMMs find their blocks from the ids: no grouping launch (tail blocks unused)
        parts = [(BM, ids, ids, max_blocks(MK, E, BM))]
        mkp = max(16, triton.next_power_of_2(MK))
    else:
        parts = group_tokens(topk_ids, E, BM, pdl=pdl, tail_m=cfg.tail_m).parts()
        mkp = 16
    rows = [bm * nb for bm, _, _, nb in parts]
    inter_all = torch.empty(sum(rows), Ip, dtype=torch.bfloat16, device=x.device)
    inters = inter_all.split(rows)
    n1, n2 = Ip // cfg.block_n1, Hp // cfg.block_n2
    S1, S = cfg.split_k1, cfg.split_k
    y = torch.empty(S, MK, H, dtype=torch.bfloat16 if cfg.y_bf16 else torch.float32, device=x.device)
    launched = []
    # each part (the blocks of block_m rows, then the tail blocks) is one GEMM1 launch and one GEMM2
    # launch; the parts share y, which GEMM2 writes by slot
    for (bm, sorted_slots, block_expert, NB), inter in zip(parts, inters):
        grid1 = NB * n1 * S1
        if cfg.stream_k1:   # a fixed grid; part holds 2 slots of [bm, 2 block_n1] per program
            grid1 = cfg.stream_k1 * sm_count(x.device)
            part = torch.empty(2 * grid1, bm * 2 * cfg.block_n1, dtype=torch.float32, device=x.device)
            locks = split_counters(weights, NB * n1)
        elif S1 > 1:
            part = torch.empty(S1, NB * bm, 2 * Ip, dtype=torch.float32, device=x.device)
            locks = split_counters(weights, NB * n1)
        else:
            part = locks = dummy
        k1 = K.moe_gemm1_kernel[(grid1,)](
            x, x.stride(0), weights.w13, weights.s13,
            weights.gs13 if weights.gs13 is not None else dummy, weights.b13 if has_bias1 else dummy,
            inter, sorted_slots, block_expert, ids, MK, E, part, locks, NB * bm * 2 * Ip,
            H, Ip, Hp, k, NB, n1, *weights.w13.stride()[:3], weights.s13.stride(1),
            float(alpha), float(beta), float(limit) if limit is not None else 0.0,
            FMT=fmt, G=G, HAS_BIAS=has_bias1, HAS_LIMIT=limit is not None,
            BM=bm, BN=cfg.block_n1, SWAP=cfg.swap, CDT=cdt, ASM=not interp, U=cfg.k_unroll, FOLD=weights.fold13,
            DIRECT=direct, MKP=mkp, PDL=pdl, SPLIT=S1, WORDS=words, PB=weights.w13.shape[3], WHOLE=cfg.whole_k,
            STREAM=bool(cfg.stream_k1), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch)
        k2 = K.moe_gemm2_kernel[(NB * n2 * S,)](
            inter, weights.w2, weights.s2,
            weights.gs2 if weights.gs2 is not None else dummy, weights.b2 if has_bias2 else dummy,
            y, sorted_slots, block_expert, topk_weights, ids, MK, E,
            H, Hp, Ip, n2, *weights.w2.stride()[:3], weights.s2.stride(1), MK * H,
            FMT=fmt, G=G, HAS_BIAS=has_bias2,
            BM=bm, BN=cfg.block_n2, SWAP=cfg.swap, CDT=cdt, ASM=not interp, U=cfg.k_unroll, FOLD=weights.fold2,
            SPLIT=S, DIRECT=direct, MKP=mkp, PDL=pdl, WORDS=words, PB=weights.w2.shape[3],
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch)
        tag = "" if bm == BM else "_tail"
        launched += [("gemm1" + tag, k1, grid1), ("gemm2" + tag, k2, NB * n2 * S)]
    _record(stats, launched)
    return _combine(y, topk_ids, E, out, shared_output, pdl)


SPLIT_COUNTERS_MIN = 1 << 16
"""Entries of the first split-K counter buffer of a set of weights (256 KB): GEMM1 needs one per
tile, blocks x Ip / block_n1, far below this for the decode batches split-K is for."""


def split_counters(weights: "MoEKernelWeights", n: int) -> torch.Tensor:
    """int32 [>= n] zeros on the weights' device that persist across calls: GEMM1's split-K
    counters. Each tile's last program resets its counter to 0, so the buffer is all zeros again
    after every call and the calls on these weights, which a model runs one after another, share
    it (two calls on the same weights running at the same time on two streams would not: run them
    one after another). It lives with the weights, not with a stream: a CUDA graph replays on any
    stream. A larger one is allocated when needed, outside graph capture (capture after a warm-up
    call at the same M, as qmoe.timing.capture_graph does); earlier ones are kept alive, since
    captured graphs hold their addresses."""
    bufs = weights.counters
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    device = weights.w13.device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"split-K GEMM1 needs {n} counters, more than these weights' buffer holds; run the call "
                           f"once at this M before CUDA-graph capture (the buffer must outlive the graph)")
    bufs.append(torch.zeros(max(n, SPLIT_COUNTERS_MIN), dtype=torch.int32, device=device))
    return bufs[-1]


def _record(stats, launches):
    """stats[name] = registers / spills / shared memory / grid of each launched kernel."""
    if stats is None:
        return
    for name, kern, grid in launches:
        stats[name] = {"regs": getattr(kern, "n_regs", None), "spills": getattr(kern, "n_spills", None),
                       "shared": getattr(getattr(kern, "metadata", None), "shared", None), "grid": grid}


def _combine(y, topk_ids, E, out, shared_output, pdl=False):
    """y: [S, M * k, H] fp32 or bf16 (S split-K partial sums) -> out (+ shared_output); rows of tokens
    with an id outside [-1, E) become NaN."""
    M, H = out.shape
    k = topk_ids.shape[1]
    BH = min(1024, triton.next_power_of_2(H))
    K.moe_combine_kernel[(M, triton.cdiv(H, BH))](
        y, topk_ids, shared_output if shared_output is not None else out, out, H, k, E, y.stride(0),
        HAS_SHARED=shared_output is not None, K_P2=max(2, triton.next_power_of_2(k)), BH=BH,
        SPLIT=y.shape[0], PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return out
