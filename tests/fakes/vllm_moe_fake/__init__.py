"""A fake of vLLM 0.33's MoE op library (`_moe_C`) for CPU tests.

`install()` registers moe_align_block_size, moe_wna16_marlin_gemm and moe_sum with torch.library
under vLLM's schemas, in a namespace of its own (`qmoe_fake_moe_C_<n>`: the real `_moe_C` is
never touched, and each install is fresh), with CPU kernels that compute what the real ops compute:

- moe_align_block_size: slots grouped by expert in blocks, vLLM's buffers and sentinels. Ids the
  real kernel would read out of bounds (< 0, or >= num_experts) raise instead.
- moe_wna16_marlin_gemm: checks shapes, dtypes and the thread-tile rule like the real op, DECODES
  THE MARLIN LAYOUT from the layout facts (written here independently of qmoe's repack: explicit
  index arithmetic per word, nibble and column, no reshape tricks shared with the adapter) and
  computes in fp32. Rows of c the real kernel leaves unwritten are set to NaN, standing for the
  garbage a real run leaves there, so a consumer that reads them fails loudly.
- moe_sum: the fp32 sum over the k slots, skipping slots whose expert maps to -1; ids outside
  the map raise (what the real kernel does with them is not verified).

`FakeOps.calls` records (op, details) per call. `uninstall()` destroys the library.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from qmoe.backends import _vllm_ops
from qmoe.formats._fp4 import e2m1_decode

SCHEMAS = {
    "moe_align_block_size": (
        "moe_align_block_size(Tensor topk_ids, int num_experts, int block_size, Tensor! sorted_token_ids, "
        "Tensor! experts_ids, Tensor! num_tokens_post_pad, Tensor? maybe_expert_map, "
        "Tensor(a!)? scatter_idx=None) -> ()"),
    "moe_wna16_marlin_gemm": (
        "moe_wna16_marlin_gemm(Tensor! a, Tensor? c_or_none, Tensor! b_q_weight, Tensor? b_bias_or_none, "
        "Tensor! b_scales, Tensor? a_scales, Tensor? global_scale, Tensor? b_zeros_or_none, Tensor! workspace, "
        "Tensor sorted_token_ids, Tensor! expert_ids, Tensor! num_tokens_past_padded, Tensor! topk_weights, "
        "int moe_block_size, int top_k, bool mul_topk_weights, int b_type_id, int size_m, int size_n, "
        "int size_k, bool use_atomic_add, bool use_fp32_reduce, bool is_zp_float, int thread_k, int thread_n, "
        "int blocks_per_sm) -> Tensor"),
    "moe_sum": "moe_sum(Tensor input, Tensor! output, Tensor? topk_ids=None, Tensor? expert_map=None) -> ()",
}
"""vLLM 0.33's schemas (from the strings in _moe_C_stable_libtorch.abi3.so)."""

OLD_MARLIN_SCHEMA = (
    "moe_wna16_marlin_gemm(Tensor! a, Tensor? c_or_none, Tensor! b_q_weight, Tensor? b_bias_or_none, "
    "Tensor! b_scales, Tensor? global_scale, Tensor? b_zeros_or_none, Tensor? g_idx_or_none, "
    "Tensor? perm_or_none, Tensor! workspace, Tensor sorted_token_ids, Tensor! expert_ids, "
    "Tensor! num_tokens_past_padded, Tensor! topk_weights, int moe_block_size, int top_k, "
    "bool mul_topk_weights, bool is_ep, int b_q_type_id, int size_m, int size_n, int size_k, "
    "bool is_full_k, bool use_atomic_add, bool use_fp32_reduce, bool is_zp_float) -> Tensor")
"""An earlier vLLM generation's schema (g_idx, perm, is_ep, is_full_k), for refusal tests."""

_COUNTER = itertools.count()

# ---- the Marlin layout, from its facts ---------------------------------------------------------
# A 16 (k) x 64 (n) tile is 128 int32 words; word 4 * lane + w holds, for n0 = 16w + lane // 4 and
# k0 = 2 * (lane % 4), the codes at (n0, k0+{0,1,8,9}) then (n0+8, k0+{0,1,8,9}), nibble e
# holding the ORDER[e]-th of those 8.
_DN = (0, 0, 0, 0, 8, 8, 8, 8)
_DK = (0, 1, 8, 9, 0, 1, 8, 9)
_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SCALE_SWAP = (0, 2, 1, 3)                      # FP4 scales: position i of 4 holds column SWAP[i]
_BIAS_PERM = [2 * i + o for i in range(4) for o in (0, 1, 8, 9, 16, 17, 24, 25)]  # per 32 columns


def decode_codes(words: torch.Tensor) -> torch.Tensor:
    """One expert's Marlin tiles int32 [K/16, 2N] -> codes uint8 [K, N] (logical k, n)."""
    KT, N2 = words.shape
    N = N2 // 2
    kt = torch.arange(KT).view(KT, 1, 1)
    wi = torch.arange(N2).view(1, N2, 1)
    e = torch.arange(8).view(1, 1, 8)
    tile, r = wi // 128, wi % 128
    lane, w = r // 4, r % 4
    slot = torch.tensor(_ORDER)[e]
    n = 64 * tile + 16 * w + lane // 4 + torch.tensor(_DN)[slot]
    k = 16 * kt + 2 * (lane % 4) + torch.tensor(_DK)[slot]
    nib = (words.view(KT, N2, 1).to(torch.int64) >> (4 * e)) & 0xF
    codes = torch.full((KT * 16, N), 255, dtype=torch.uint8)
    codes[k.expand_as(nib).reshape(-1), n.expand_as(nib).reshape(-1)] = nib.reshape(-1).to(torch.uint8)
    assert (codes != 255).all(), "the word -> (n, k) map must cover every weight once"
    return codes


def _scale_column(p: torch.Tensor, fp4: bool) -> torch.Tensor:
    """Logical column held at Marlin scale position p."""
    if fp4:
        p = 4 * (p // 4) + torch.tensor(_SCALE_SWAP)[p % 4]
    q = p % 64
    return 64 * (p // 64) + 8 * (q % 8) + q // 8


def decode_columns(t: torch.Tensor, fp4: bool) -> torch.Tensor:
    """[..., N] in Marlin scale order -> logical column order."""
    p = torch.arange(t.shape[-1])
    out = torch.empty_like(t)
    out[..., _scale_column(p, fp4)] = t
    return out


def decode_bias(b: torch.Tensor) -> torch.Tensor:
    """[..., N] in Marlin bias order -> logical order."""
    p = torch.arange(b.shape[-1])
    out = torch.empty_like(b)
    out[..., 32 * (p // 32) + torch.tensor(_BIAS_PERM)[p % 32]] = b
    return out


def _s0e5m3(byte: torch.Tensor) -> torch.Tensor:
    """S0E5M3 bytes (exponent bias 15, no sign) -> float32."""
    b = byte.to(torch.int32)
    ex, man = b >> 3, (b & 7).float()
    normal = torch.ldexp(1 + man / 8, ex - 15)
    return torch.where(ex > 0, normal, torch.ldexp(man / 8, torch.full_like(ex, -14)))


def dequantize_expert(words, scales, b_type_id, global_scale=None) -> torch.Tensor:
    """float32 [K, N] of one expert from its Marlin tiles and scales [G, N]."""
    codes = decode_codes(words)
    K, N = codes.shape
    G = scales.shape[0]
    if b_type_id == _vllm_ops.UINT4B8:
        vals = codes.float() - 8
        s = decode_columns(scales.float(), fp4=False)
    elif scales.dtype == torch.float8_e8m0fnu:  # MXFP4
        vals = e2m1_decode(codes)
        byte = decode_columns(scales.view(torch.uint8), fp4=True).to(torch.int32)
        s = torch.where(byte == 255, float("nan"), torch.ldexp(torch.ones_like(byte, dtype=torch.float32), byte - 127))
    else:  # NVFP4: real scale = S0E5M3 x global x 2^-126
        vals = e2m1_decode(codes)
        s = _s0e5m3(decode_columns(scales.view(torch.uint8), fp4=True)) * (global_scale.float() * 2.0 ** -126)
    return vals * s.repeat_interleave(K // G, dim=0)


# ---- the ops -----------------------------------------------------------------------------------

def _check(cond, msg):
    if not cond:
        raise RuntimeError(f"fake _moe_C: {msg}")


@dataclass
class FakeOps:
    namespace: str
    lib: object = None
    calls: list = field(default_factory=list)

    def uninstall(self):
        if self.lib is not None:
            self.lib._destroy()
            self.lib = None

    # moe_align_block_size --------------------------------------------------------------------
    def align(self, topk_ids, num_experts, block_size, sorted_token_ids, experts_ids, num_tokens_post_pad,
              maybe_expert_map, scatter_idx=None):
        ids = topk_ids.reshape(-1).long()
        numel = ids.numel()
        self.calls.append(("moe_align_block_size", {"block_size": block_size, "num_experts": num_experts,
                                                    "expert_map": maybe_expert_map is not None}))
        _check(topk_ids.dtype == torch.int32, f"topk_ids must be int32, got {topk_ids.dtype}")
        _check(-(-num_experts // 32) * 32 < 1024, "padded_num_experts must be less than 1024")
        local = ids
        if maybe_expert_map is not None:
            _check(maybe_expert_map.numel() >= num_experts, "expert_map shorter than num_experts")
            local = _map_ids(maybe_expert_map, ids, num_experts)
        else:
            _check(bool(((ids >= 0) & (ids < num_experts)).all()),
                   f"topk id out of [0, {num_experts}) read as an index (out of bounds on the GPU): {ids.tolist()}")
        counts = torch.bincount(local[local >= 0], minlength=num_experts)
        padded = -(-counts // block_size) * block_size
        starts = torch.cumsum(padded, 0) - padded
        total = int(padded.sum())
        _check(sorted_token_ids.numel() >= total and experts_ids.numel() * block_size >= total,
               "buffers too small (out-of-bounds writes on the GPU)")
        sorted_token_ids.fill_(numel)
        experts_ids.fill_(-1)
        for e in range(num_experts):
            slots = (local == e).nonzero().view(-1)
            s = int(starts[e])
            sorted_token_ids[s:s + slots.numel()] = slots.to(torch.int32)
            experts_ids[s // block_size:(s + int(padded[e])) // block_size] = e
        num_tokens_post_pad[0] = total

    # moe_wna16_marlin_gemm -------------------------------------------------------------------
    def gemm(self, a, c_or_none, b_q_weight, b_bias_or_none, b_scales, a_scales, global_scale, b_zeros_or_none,
             workspace, sorted_token_ids, expert_ids, num_tokens_past_padded, topk_weights, moe_block_size, top_k,
             mul_topk_weights, b_type_id, size_m, size_n, size_k, use_atomic_add, use_fp32_reduce, is_zp_float,
             thread_k, thread_n, blocks_per_sm):
        self.calls.append(("moe_wna16_marlin_gemm", {
            "block": moe_block_size, "top_k": top_k, "mul": mul_topk_weights, "size": (size_m, size_n, size_k),
            "bias": b_bias_or_none is not None, "fp32_reduce": use_fp32_reduce, "atomic": use_atomic_add}))
        E = b_q_weight.shape[0]
        _check(a.dtype in (torch.bfloat16, torch.float16) and a.is_contiguous(), "a: bf16/fp16 contiguous")
        _check(tuple(a.shape) == (size_m, size_k), f"a is {list(a.shape)}, size_m, size_k = {size_m}, {size_k}")
        _check(moe_block_size in (8, 16, 32, 48, 64), f"unsupported moe_block_size={moe_block_size}")
        _check(b_q_weight.dtype == torch.int32 and b_q_weight.is_contiguous(), "b_q_weight: int32 contiguous")
        _check(tuple(b_q_weight.shape[1:]) == (size_k // 16, 2 * size_n),
               f"b_q_weight is {list(b_q_weight.shape)} for size_k {size_k}, size_n {size_n}")
        _check((size_n % 64 == 0 and size_k % 128 == 0) or (size_n % 128 == 0 and size_k % 64 == 0),
               f"Invalid thread config for MKN = [{size_m}, {size_k}, {size_n}]")
        _check(b_type_id in (_vllm_ops.UINT4B8, _vllm_ops.FLOAT4_E2M1F), f"b_type_id {b_type_id} not faked")
        _check(a_scales is None and b_zeros_or_none is None and not is_zp_float, "W4A16 without zero points")
        _check(b_scales.dim() == 3 and b_scales.shape[0] == E and b_scales.shape[2] == size_n
               and b_scales.is_contiguous(), f"b_scales is {list(b_scales.shape)}")
        group = size_k // b_scales.shape[1]
        if b_type_id == _vllm_ops.UINT4B8:
            _check(b_scales.dtype == a.dtype and group in (32, 64, 128, size_k), "uint4b8: scales of a's dtype")
            _check(global_scale is None, "global_scale can only be used for nvfp4 format")
        elif b_scales.dtype == torch.float8_e8m0fnu:
            _check(group == 32 and global_scale is None, "mxfp4: e8m0 scales per 32, no global_scale")
        else:
            _check(b_scales.dtype == torch.float8_e4m3fn and group == 16, "nvfp4: e4m3 scales per 16")
            _check(global_scale is not None and global_scale.dtype == torch.float32
                   and global_scale.shape == (E,), "the global_scale parameter must be passed for nvfp4 format")
        if b_bias_or_none is not None:
            _check(tuple(b_bias_or_none.shape) == (E, size_n) and b_bias_or_none.dtype == a.dtype
                   and b_bias_or_none.is_contiguous(), f"b_bias is {b_bias_or_none.dtype} {list(b_bias_or_none.shape)}")
        _check(workspace.dtype == torch.int32 and not workspace.any(), "workspace: int32 zeros (the locks)")
        _check(topk_weights.dtype == torch.float32 and topk_weights.numel() >= size_m * top_k, "topk_weights: fp32")
        rows = size_m * top_k
        c = c_or_none if c_or_none is not None else torch.empty(rows, size_n, dtype=a.dtype)
        _check(tuple(c.shape) == (rows, size_n) and c.dtype == a.dtype and c.is_contiguous(),
               f"c is {c.dtype} {list(c.shape)}, expected [{rows}, {size_n}]")
        written = torch.zeros(rows, dtype=torch.bool)
        tw = topk_weights.reshape(-1).float()
        B = moe_block_size
        weights = {}
        for blk in range(int(num_tokens_past_padded[0]) // B):
            e = int(expert_ids[blk])
            if e < 0:
                continue
            r = sorted_token_ids[blk * B:(blk + 1) * B].long()
            r = r[r < rows]
            if e not in weights:
                weights[e] = dequantize_expert(b_q_weight[e], b_scales[e], b_type_id,
                                               None if global_scale is None else global_scale[e])
            acc = a[r // top_k].float() @ weights[e]
            if b_bias_or_none is not None:
                acc = acc + decode_bias(b_bias_or_none[e].float())
            if mul_topk_weights:
                acc = acc * tw[r].unsqueeze(1)
            c[r] = acc.to(c.dtype)
            written[r] = True
        c[~written] = float("nan")  # what the real kernel leaves there is garbage
        return c

    # moe_sum ---------------------------------------------------------------------------------
    def sum(self, input, output, topk_ids=None, expert_map=None):
        self.calls.append(("moe_sum", {"topk_ids": topk_ids is not None, "expert_map": expert_map is not None}))
        M, k, H = input.shape
        _check(tuple(output.shape) == (M, H) and output.dtype == input.dtype, "output: [M, H] of input's dtype")
        x = input.float()
        if topk_ids is not None and expert_map is not None:
            _check(tuple(topk_ids.shape) == (M, k), "moe_sum: topk_ids must have shape [num_tokens, topk]")
            _check(expert_map.dtype == torch.int32, "moe_sum: expert_map must be int32")
            keep = _map_ids(expert_map, topk_ids.long(), expert_map.numel()) >= 0
            x = torch.where(keep.unsqueeze(-1), x, torch.zeros_like(x))
        output.copy_(x.sum(dim=1))


def _map_ids(expert_map, ids, n):
    """expert_map[id] the way the CUDA ops read it, a raw index: id -1 reads the word just before
    the map (which must be inside the map's allocation: a view with a storage offset), ids in
    [0, n) the map itself; anything else would be an out-of-bounds read on the GPU."""
    _check(bool(((ids >= -1) & (ids < n)).all()), f"topk id out of [-1, {n}) read as an index into the expert map "
                                                  f"(out of bounds on the GPU): {ids.tolist()}")
    if bool((ids == -1).any()):
        _check(expert_map.storage_offset() >= 1 and expert_map.stride(0) == 1,
               "topk id -1 reads the word before the expert map, outside its allocation (out of bounds on the GPU)")
        before = torch.as_strided(expert_map, (expert_map.numel() + 1,), (1,), expert_map.storage_offset() - 1)
        return before.long()[ids + 1]
    return expert_map.long()[ids]


def install(schemas: dict | None = None) -> FakeOps:
    """Register the fake ops (vLLM 0.33's schemas, or `schemas`: op name -> schema string, only
    those ops) under a fresh namespace. Returns the FakeOps; call .uninstall() when done."""
    fake = FakeOps(f"qmoe_fake_moe_C_{next(_COUNTER)}")
    lib = torch.library.Library(fake.namespace, "DEF")
    impls = {"moe_align_block_size": fake.align, "moe_wna16_marlin_gemm": fake.gemm, "moe_sum": fake.sum}
    for name, schema in (SCHEMAS if schemas is None else schemas).items():
        lib.define(schema)
        if name in impls and schema == SCHEMAS.get(name):
            lib.impl(name, impls[name], "CPU")
    fake.lib = lib
    return fake


__all__ = ["FakeOps", "OLD_MARLIN_SCHEMA", "SCHEMAS", "decode_codes", "dequantize_expert", "install"]
