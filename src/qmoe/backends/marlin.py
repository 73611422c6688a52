"""The `marlin` backend: vLLM's Marlin MoE kernel (`moe_wna16_marlin_gemm` in vLLM's `_moe_C` op
library), W4A16 with bf16 activations, run the way vLLM 0.33 runs it (MarlinExperts /
fused_marlin_moe): moe_align_block_size, GEMM1 (+ bias), the activation, GEMM2 (+ bias, x the
routing weight), moe_sum. Formats: mxfp4, int4 group 32 (as uint4b8), nvfp4. A yardstick for
qmoe's own kernels, on the same canonical bytes (no requantization, no vLLM repack op).

Prepared layout (on the weights' device; Hp, Ip = hidden and intermediate size padded, see
`padded_sizes`; G = the format's block, 32 or 16):
  w13: int32 [E, Hp/16, 4Ip]   Marlin tiles of w13[e].T ([Hp, 2Ip]; columns [gate (Ip); up (Ip)])
  w2:  int32 [E, Ip/16, 2Hp]   Marlin tiles of w2[e].T ([Ip, Hp])
  s13: [E, Hp/G, 2Ip], s2: [E, Ip/G, Hp]  scales, K-major, Marlin column order:
       int4  bf16 (as given);  mxfp4  float8_e8m0fnu (the E8M0 bytes as given);
       nvfp4 S0E5M3 bytes in a float8_e4m3fn tensor (`nvfp4_marlin_scales`)
  g13, g2: fp32 [E] (nvfp4 only)  global scale x 2^(119 - x), x per matrix (`nvfp4_scale_exponent`)
  b13: bf16 [E, 2Ip], b2: bf16 [E, Hp]  biases in Marlin's bias order (each only when given)
  expert_map: int32 [E + 2] = -1, 0..E-1, -1 (the ops get the view [1:], see below);
  workspace: int32 zeros [SMs x 4] (the kernel's locks)
Padding is zero bytes in codes, scales and biases (as vLLM pads): E2M1 code 0 is 0, and a padded
int4 code (uint4b8 0, i.e. -8) sits in a zero-scale group or row, so padded rows and columns
compute exactly 0; x's padded columns are 0 and the output is trimmed back to H columns.

Forward (mirrors vLLM's sequence; no host synchronization, CUDA-graph capturable):
  moe_align_block_size(topk_ids, E + 1, block_m, ..., expert_map[1:]): the ops read an id as an
      index into the map, so id -1 reads the guard word before the view, -1 (no expert), and
      those slots get no rows, as under vLLM's expert parallelism. No launch maps the ids
      (until session 5 a torch.where turned -1 into E, two launches more than vLLM runs). Ids
      below -1 or >= E would be read outside the map: qmoe.MoE's id guard (check_ids, on by
      default) hands backends -1 for them;
  GEMM1 [M*k, 2Ip] = x @ w13 (+ b13); the activation: one Triton launch of qmoe's SwiGLU in
      fp32 on the [gate | up] halves (kernels/activation.py: swiglu_rows; vLLM runs its fused
      activation op, on GPT-OSS's interleaved rows; the row order does not change the GEMM). It
      was a chain of about eight PyTorch elementwise launches until session 4, the likely cause
      of Marlin's decode gap to vLLM's run of the same kernels (gpt-oss M=1: 74 against 56 us);
  GEMM2 [M*k, Hp] = act @ w2 (+ b2), x topk_weights; moe_sum over the k slots (skipping the
      slots of id -1, through the same map) into out (or a bf16 buffer copied into out).
block_m = the first of 8, 16, 32, 48, 64 with M*k/E/block_m < 0.9 (vLLM's rule), else 64.
Buffers are allocated per call, sized from M (graph-capture safe). Marlin reduces across thread
blocks with atomics and locks: results are NOT bitwise reproducible run to run.

Layout details (vLLM marlin_utils*.py facts, checked byte for byte against vLLM's pure-torch
reference on the CPU; docs/peers/marlin.md):
- Weights. Marlin takes B = W.T, [K, N], cut into 16 x 64 tiles (16 k by 64 n), each tile
  1024 codes in 128 int32 words; a k-tile row holds N/64 tiles. Word 4*lane + w (lane 0..31,
  w 0..3) of a tile holds, for n = 16w + lane/4 (and n + 8) and k = 2(lane%4) + {0, 1, 8, 9},
  the 8 codes (n,k0) (n,k1) (n,k8) (n,k9) (n+8,k0) (n+8,k1) (n+8,k8) (n+8,k9) in nibble order
  {0, 2, 4, 6, 1, 3, 5, 7} (nibble e at bits 4e). `marlin_tiles` / `marlin_untiles`.
- Scales: K-major [K/G, N]; in each run of 64 columns, column 8i + j takes column 8j + i (an
  8 x 8 transpose; vLLM's 64-entry scale permutation); for FP4 (mxfp4, nvfp4) then positions
  1 and 2 of every 4 consecutive columns swap (vLLM's [0, 2, 1, 3]). `marlin_scales`.
- Biases: in each run of 32 columns, column 8i + 2a + s takes column 8a + 2i + s (vLLM's
  32-entry "single" permutation). `marlin_bias`.
- int4: Marlin's uint4b8 stores code + 8: each byte XOR 0x88 (`int4_to_uint4b8`).
- NVFP4: `nvfp4_marlin_scales` (vLLM's S0E5M3 trick for bf16 activations).
- Tile constraints: each GEMM needs (N % 64, K % 128) or (N % 128, K % 64) (vLLM 0.33's
  thread configs: 128x128, 64x256, 64x128 and 128x64 (k x n) tiles), K % G == 0.
"""

from __future__ import annotations

import torch

from ..formats import block_size
from ..kernels import sm_count
from ..spec import MoESpec
from ..weights import ExpertWeights
from . import _vllm_ops
from .base import Backend, Prepared, Support, cuda_capability, finish_output, output_buffer

TILE = 16
MAX_BLOCKS_PER_SM = 4  # vLLM's MARLIN_MAX_BLOCKS_PER_SM: the workspace holds SMs x 4 locks
BLOCK_SIZES_M = (8, 16, 32, 48, 64)
_CHUNK_CODES = 1 << 27  # codes repacked at once (bounds prepare's temporaries to ~0.5 GB)


class MarlinBackend(Backend):
    """vLLM's Marlin MoE.

    pad_like_vllm: pad MXFP4 weights the way vLLM does for GPT-OSS (see `padded_sizes`) instead
        of the minimal padding (same results; for timing the two against each other).
    ops_namespace, ops_package: where the ops are registered and which package's directory holds
        their library (vLLM's `_moe_C` and `vllm`; tests point them at a fake op library
        registered under a namespace of its own, see _vllm_ops.load).
    """

    name = "marlin"
    formats = ("mxfp4", "nvfp4", "int4")
    capturable = True
    tunable = False
    first_use = "none beyond loading vLLM's _moe_C library once (its kernels are precompiled)"
    MAX_EXPERTS = 991  # moe_align_block_size scans E + 1 experts in one block of < 1024 threads

    def __init__(self, pad_like_vllm: bool = False, ops_namespace: str = _vllm_ops.NAMESPACE,
                 ops_package: str = _vllm_ops.PACKAGE):
        self.pad_like_vllm = pad_like_vllm
        self.ops_namespace = ops_namespace
        self.ops_package = ops_package

    def _ops(self):
        return _vllm_ops.load(self.ops_namespace, self.ops_package)

    def _supports(self, spec, fmt, device) -> Support:
        cap = _device_capability(device)
        if cap is None:
            return Support(False, f"needs a CUDA GPU (SM80 or newer; vLLM runs Marlin on SM90); device {device} "
                                  f"is not one or no GPU is visible")
        if cap < (8, 0):
            return Support(False, f"Marlin needs SM80 or newer; this GPU is SM{cap[0]}{cap[1]}")
        if spec.num_experts > self.MAX_EXPERTS:
            return Support(False, f"moe_align_block_size handles at most {self.MAX_EXPERTS} experts (one thread "
                                  f"block); this spec has {spec.num_experts}")
        if fmt == "mxfp4" and not hasattr(torch, "float8_e8m0fnu"):
            return Support(False, f"MXFP4 scales go to Marlin as float8_e8m0fnu, which torch {torch.__version__} "
                                  f"lacks: install torch >= 2.7")
        ops, why = self._ops()
        if ops is None:
            return Support(False, why)
        version = "" if ops.version == "unknown" else f" {ops.version}"
        return Support(True, f"vLLM{version} Marlin MoE (moe_wna16_marlin_gemm), {fmt} weights, bf16 activations, "
                             f"on SM{cap[0]}{cap[1]}")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        ops, _ = self._ops()
        fmt, dev = weights.format, weights.device
        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        G = block_size(fmt)
        like_vllm = self.pad_like_vllm and fmt == "mxfp4"  # vLLM pads only its MXFP4 MoE beyond the minimum
        Hp, Ip = padded_sizes(H, I, like_vllm)
        fp4 = fmt in ("mxfp4", "nvfp4")

        def tiles(q, rows, cols, parts):  # [E, rows, cols] logical -> int32 [E, cols/16, 2 rows]
            out = torch.empty(E, cols // TILE, 2 * rows, dtype=torch.int32, device=dev)
            step = max(1, _CHUNK_CODES // (rows * cols))
            for e in range(0, E, step):  # a few experts at a time: temporaries stay small
                d = q.data[e:e + step]
                d = int4_to_uint4b8(d) if fmt == "int4" else d  # padding after: zero bytes, as vLLM pads
                d = pad_parts(pad_parts(d, 1, rows // parts, parts), 2, cols // 2)
                out[e:e + step] = marlin_tiles(d)
            return out

        def scales(q, rows, cols, parts):  # -> [E, cols/G, rows]
            s = pad_parts(pad_parts(q.scales, 1, rows // parts, parts), 2, cols // G)
            return marlin_scales(s, fp4)

        t = {"w13": tiles(weights.w13, 2 * Ip, Hp, 2), "w2": tiles(weights.w2, Hp, Ip, 1)}
        s13, s2 = scales(weights.w13, 2 * Ip, Hp, 2), scales(weights.w2, Hp, Ip, 1)
        meta = {}
        if fmt == "mxfp4":
            s13, s2 = s13.view(torch.float8_e8m0fnu), s2.view(torch.float8_e8m0fnu)
        elif fmt == "nvfp4":
            x13, x2 = nvfp4_scale_exponent(s13), nvfp4_scale_exponent(s2)
            s13, s2 = nvfp4_marlin_scales(s13, x13), nvfp4_marlin_scales(s2, x2)
            t["g13"] = nvfp4_marlin_global(weights.w13.global_scale, x13).contiguous()
            t["g2"] = nvfp4_marlin_global(weights.w2.global_scale, x2).contiguous()
            meta["nvfp4_exponents"] = (x13, x2)
        t["s13"], t["s2"] = s13, s2
        if weights.b13 is not None:
            t["b13"] = marlin_bias(pad_parts(weights.b13, 1, Ip, 2).to(torch.bfloat16))
        if weights.b2 is not None:
            t["b2"] = marlin_bias(pad_parts(weights.b2, 1, Hp).to(torch.bfloat16))
        t["expert_map"] = torch.cat((torch.full((1,), -1, dtype=torch.int32, device=dev),
                                     torch.arange(E, dtype=torch.int32, device=dev),
                                     torch.full((1,), -1, dtype=torch.int32, device=dev)))
        t["workspace"] = torch.zeros(sm_count(dev) * MAX_BLOCKS_PER_SM, dtype=torch.int32, device=dev)
        from ..kernels.activation import swiglu_rows

        meta.update({
            "ops": ops, "library": ops.library, "vllm": ops.version, "num_experts": E, "swiglu_rows": swiglu_rows,
            "hidden_size": H, "hidden_padded": Hp, "intermediate_size": I, "intermediate_padded": Ip,
            "b_type_id": _vllm_ops.UINT4B8 if fmt == "int4" else _vllm_ops.FLOAT4_E2M1F,
            "padding": "vllm" if like_vllm else "minimal"})
        return Prepared(self.name, spec, fmt, dev, t, meta)

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        """x: [M, H] bf16 (fp16 / fp32 are rounded to bf16: Marlin computes in bf16 here);
        topk_ids: [M, k] int (-1 = no expert); topk_weights: [M, k] float; out: [M, H] float
        (written); shared_output: [M, H] or None (added). Returns out. No host sync."""
        self.check_prepared(prepared)
        t, m = prepared.tensors, prepared.meta
        M, k = topk_ids.shape
        H, Hp, Ip, E = m["hidden_size"], m["hidden_padded"], m["intermediate_padded"], m["num_experts"]
        if x.shape != (M, H) or out.shape != (M, H):
            raise ValueError(f"x, out: expected [{M}, {H}] (topk_ids has {M} rows), got {list(x.shape)}, "
                             f"{list(out.shape)}")
        if M == 0:
            return out
        ops, dev, bf16 = m["ops"], x.device, torch.bfloat16
        a = x.to(bf16)
        if Hp != H:
            a = torch.nn.functional.pad(a, (0, Hp - H))
        a = a.contiguous()
        ids = topk_ids.to(torch.int32).contiguous()  # no copy for int32 ids
        emap = t["expert_map"][1:]  # id -1 reads the guard word before it: no expert
        tw = topk_weights.to(torch.float32).contiguous()
        block = block_size_m(M, k, E)
        n_sorted, n_blocks = _vllm_ops.align_sizes(M * k, E + 1, block)
        sorted_ids = torch.empty(n_sorted, dtype=torch.int32, device=dev)
        expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)
        n_padded = torch.empty(1, dtype=torch.int32, device=dev)
        ops.moe_align_block_size(ids, E + 1, block, sorted_ids, expert_ids, n_padded, emap)
        route = dict(workspace=t["workspace"], sorted_token_ids=sorted_ids, expert_ids=expert_ids,
                     num_tokens_past_padded=n_padded, topk_weights=tw, moe_block_size=block,
                     b_type_id=m["b_type_id"])
        h = torch.empty(M * k, 2 * Ip, dtype=bf16, device=dev)
        ops.moe_wna16_marlin_gemm(a, h, t["w13"], t.get("b13"), t["s13"], t.get("g13"), top_k=k,
                                  mul_topk_weights=False, size_m=M, size_n=2 * Ip, size_k=Hp, **route)
        sw = prepared.spec.activation  # one launch (vLLM runs its fused activation op here too)
        act = m["swiglu_rows"](h, torch.empty(M * k, Ip, dtype=bf16, device=dev), sw.alpha, sw.beta, sw.limit)
        y = torch.empty(M * k, Hp, dtype=bf16, device=dev)
        ops.moe_wna16_marlin_gemm(act, y, t["w2"], t.get("b2"), t["s2"], t.get("g2"), top_k=1,
                                  mul_topk_weights=True, size_m=M * k, size_n=Hp, size_k=Ip, **route)
        dst = output_buffer(out, Hp)
        ops.moe_sum(y.view(M, k, Hp), dst, ids, emap)
        return finish_output(out, dst, shared_output)


# ---- sizes -------------------------------------------------------------------------------------

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def padded_sizes(hidden_size: int, intermediate_size: int, pad_like_vllm: bool = False) -> tuple[int, int]:
    """(Hp, Ip): the smallest padding that gives both GEMMs a Marlin thread tile.

    GEMM1 is N = 2Ip, K = Hp; GEMM2 is N = Hp, K = Ip. Each needs (N % 64 and K % 128) or
    (N % 128 and K % 64), so (Hp % 128, Ip % 64) or (Hp % 64, Ip % 128): the cheaper of the two,
    on a tie the one that leaves H alone (padding H costs a copy of x and of the output per call;
    padding I costs nothing per call). gpt-oss (2880, 2880) -> (2880, 2944).
    pad_like_vllm: vLLM's MXFP4 rule instead (H to a multiple of 256, I of 128: gpt-oss ->
    (3072, 2944)), which makes Marlin's first-choice thread tiles (128x128 small batch, 64x256
    large batch) valid for both GEMMs, for 9 % more weight bytes at gpt-oss shapes.
    """
    H, I = hidden_size, intermediate_size
    if pad_like_vllm:
        return _round_up(H, 256), _round_up(I, 128)
    options = ((_round_up(H, 128), _round_up(I, 64)), (_round_up(H, 64), _round_up(I, 128)))
    return min(options, key=lambda hi: (hi[0] * hi[1], hi[0]))


def block_size_m(num_tokens: int, top_k: int, num_experts: int) -> int:
    """vLLM's M block of the Marlin MoE: the first of 8, 16, 32, 48, 64 with
    num_tokens * top_k / num_experts / block < 0.9, else 64."""
    for b in BLOCK_SIZES_M:
        if num_tokens * top_k / num_experts / b < 0.9:
            return b
    return BLOCK_SIZES_M[-1]


# ---- padding -----------------------------------------------------------------------------------

def pad_parts(t: torch.Tensor, dim: int, size: int, parts: int = 1) -> torch.Tensor:
    """t with each of its `parts` equal slices along `dim` zero-padded (zero bytes) to `size`.

    t: [..., parts * n, ...] any dtype -> [..., parts * size, ...] (t itself when n == size).
    w13 rows are 2 parts (gate, up). Inverse: `unpad_parts`.
    """
    n = t.shape[dim] // parts
    if n == size:
        return t
    if t.shape[dim] % parts or size < n:
        raise ValueError(f"t: expected dim {dim} of {parts} parts of at most {size}, got {list(t.shape)}")
    bits = _bits(t)
    shape = list(t.shape)
    shape[dim] = parts * size
    out = torch.zeros(shape, dtype=bits.dtype, device=t.device)
    for p in range(parts):
        out.narrow(dim, p * size, n).copy_(bits.narrow(dim, p * n, n))
    return out.view(t.dtype)


def unpad_parts(t: torch.Tensor, dim: int, size: int, parts: int = 1) -> torch.Tensor:
    """Inverse of `pad_parts`: the first `size` of each of the `parts` slices along `dim`."""
    n = t.shape[dim] // parts
    if n == size:
        return t
    return torch.cat([t.narrow(dim, p * n, size) for p in range(parts)], dim)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as an integer tensor (zeros, copies and views on any dtype, float8 included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# ---- weights -----------------------------------------------------------------------------------

def marlin_tiles(data: torch.Tensor) -> torch.Tensor:
    """Canonical packed codes -> Marlin tiles.

    data: uint8 [E, N, K/2] (two codes per byte, low nibble = even k), N % 64 == 0, K % 16 == 0
    -> int32 [E, K/16, 2N]. Inverse: `marlin_untiles`.
    """
    E, N, K2 = data.shape
    K = 2 * K2
    if N % 64 or K % TILE:
        raise ValueError(f"data: expected [E, N, K/2] with N % 64 == 0 and K % 16 == 0, got {list(data.shape)}")
    codes = torch.stack((data & 0xF, data >> 4), dim=-1)  # [E, N, K/2, 2]: k = 2p + l
    # n = 64c + 16w + 8b + q (q = lane / 4), k = 16kt + 8h + 2t + l (t = lane % 4)
    codes = codes.view(E, N // 64, 4, 2, 8, K // TILE, 2, 4, 2)      # e c w b q kt h t l
    codes = codes.permute(0, 5, 1, 4, 7, 2, 8, 3, 6)                 # e kt c q t w l b h
    # nibble e = 4l + 2b + h: a byte holds (h=0, h=1), the 4 bytes of a word run over (l, b)
    packed = (codes[..., 0] | (codes[..., 1] << 4)).contiguous()
    return packed.view(E, K // TILE, 8 * N).view(torch.int32)


def marlin_untiles(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of `marlin_tiles`: int32 [E, K/16, 2N] -> uint8 [E, N, K/2]."""
    E, KT, N2 = tiles.shape
    N, K = N2 // 2, KT * TILE
    b = tiles.contiguous().view(torch.uint8).view(E, KT, N // 64, 8, 4, 4, 2, 2)  # e kt c q t w l b
    codes = torch.stack((b & 0xF, b >> 4), dim=-1)                                 # ... h
    codes = codes.permute(0, 2, 5, 7, 3, 1, 8, 4, 6).reshape(E, N, K // 2, 2)      # e c w b q kt h t l
    return (codes[..., 0] | (codes[..., 1] << 4)).contiguous()


def int4_to_uint4b8(data: torch.Tensor) -> torch.Tensor:
    """Two's complement int4 nibbles -> uint4b8 (code + 8 mod 16), both nibbles of each byte.
    data: uint8 [...] -> uint8 [...]. Its own inverse."""
    return data ^ 0x88


uint4b8_to_int4 = int4_to_uint4b8


# ---- scales and biases -------------------------------------------------------------------------

def marlin_scales(scales: torch.Tensor, fp4: bool) -> torch.Tensor:
    """Canonical scales -> Marlin's: K-major, 8 x 8 transpose per 64 columns, then for FP4 the
    [0, 2, 1, 3] swap per 4 columns.

    scales: [E, N, G] any dtype (N % 64 == 0) -> [E, G, N] same dtype (values unchanged).
    Inverse: `marlin_unscales`.
    """
    E, N, G = scales.shape
    if N % 64:
        raise ValueError(f"scales: expected [E, N, G] with N % 64 == 0, got {list(scales.shape)}")
    t = scales.transpose(1, 2).reshape(E, G, N // 64, 8, 8).transpose(-1, -2)
    if fp4:
        t = t.reshape(E, G, N // 4, 2, 2).transpose(-1, -2)
    return t.reshape(E, G, N).contiguous()


def marlin_unscales(scales: torch.Tensor, fp4: bool) -> torch.Tensor:
    """Inverse of `marlin_scales`: [E, G, N] -> [E, N, G]."""
    E, G, N = scales.shape
    t = scales
    if fp4:
        t = t.reshape(E, G, N // 4, 2, 2).transpose(-1, -2)
    t = t.reshape(E, G, N // 64, 8, 8).transpose(-1, -2)
    return t.reshape(E, G, N).transpose(1, 2).contiguous()


def marlin_bias(bias: torch.Tensor) -> torch.Tensor:
    """Bias in Marlin's order: in each run of 32, position 8i + 2a + s takes 8a + 2i + s.
    bias: [..., N] (N % 32 == 0) -> [..., N]. Inverse: `marlin_unbias`."""
    *lead, N = bias.shape
    if N % 32:
        raise ValueError(f"bias: expected [..., N] with N % 32 == 0, got {list(bias.shape)}")
    return bias.reshape(*lead, N // 32, 4, 4, 2).transpose(-3, -2).reshape(*lead, N).contiguous()


def marlin_unbias(bias: torch.Tensor) -> torch.Tensor:
    """Inverse of `marlin_bias` (the same 4 x 4 transpose of pairs)."""
    return marlin_bias(bias)


# ---- NVFP4 -------------------------------------------------------------------------------------
# vLLM's NVFP4 for bf16 activations: an E4M3 scale s (>= 0) is stored as the byte of s x 2^(7+x)
# in "S0E5M3" (exponent 5 bits with bias 15, mantissa 3 bits, no sign): the high byte of the
# fp16 bits shifted left once. Values below 2 (after the factor) become 0, so every stored
# nonzero scale has its top bit set, which the kernel's dequantization relies on. The factor
# 2^x (one per matrix over all experts: the largest scale below 448 is lifted into [224, 448])
# is divided out of the fp32 global scale, which also carries the 2^119 that turns the kernel's
# E2M1 x S0E5M3 products (exponent bias 126 in bf16, minus 7) into real values.

def nvfp4_scale_exponent(scales: torch.Tensor) -> int:
    """x of the factor 2^x: floor(log2(448 / largest positive scale)) when that is below 448,
    else 0 (vLLM's _nvfp4_compute_scale_factor; NaN and negative scales are ignored).
    scales: float8_e4m3fn [...]. Host sync (prepare only)."""
    v = scales.float() * 2.0 ** 7
    pos = v[v > 0]
    if pos.numel() == 0:
        return 0
    vmax = pos.max()
    if not bool(vmax < 448.0 * 2 ** 7):
        return 0
    return int(torch.floor(torch.log2(448.0 * 2 ** 7 / vmax)).item())


def nvfp4_marlin_scales(scales: torch.Tensor, exponent: int) -> torch.Tensor:
    """E4M3 scales -> Marlin's S0E5M3 bytes of scale x 2^(7 + exponent), values below 2 flushed
    to 0 (as vLLM does: negative and tiny scales are lost).
    scales: float8_e4m3fn [...] -> float8_e4m3fn [...] holding the S0E5M3 bytes.
    Inverse (exact for every scale not flushed): `nvfp4_unmarlin_scales`."""
    h = (scales.float() * 2.0 ** (7 + exponent)).to(torch.float16)
    h = torch.where(h < 2, torch.zeros_like(h), h)
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    return ((bits >> 7) & 0xFF).to(torch.uint8).view(torch.float8_e4m3fn)


def nvfp4_unmarlin_scales(scales: torch.Tensor, exponent: int) -> torch.Tensor:
    """Inverse of `nvfp4_marlin_scales`: S0E5M3 bytes -> float8_e4m3fn scales."""
    h = (scales.view(torch.uint8).to(torch.int16) << 7).view(torch.float16)
    return (h.float() * 2.0 ** -(7 + exponent)).to(torch.float8_e4m3fn)


def nvfp4_marlin_global(global_scale: torch.Tensor, exponent: int) -> torch.Tensor:
    """fp32 [E] global scales -> g x 2^(119 - exponent) (exact). Inverse: `nvfp4_unmarlin_global`."""
    return global_scale.float() * 2.0 ** (119 - exponent)


def nvfp4_unmarlin_global(global_scale: torch.Tensor, exponent: int) -> torch.Tensor:
    """Inverse of `nvfp4_marlin_global`."""
    return global_scale * 2.0 ** (exponent - 119)


# ---- devices -------------------------------------------------------------------------------------

def _device_capability(device):
    return cuda_capability(device)  # tests replace this to pretend a GPU


BACKEND = MarlinBackend()
