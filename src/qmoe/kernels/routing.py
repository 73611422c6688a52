"""Fused routing: router logits [M, E] -> (topk_ids, topk_weights) in one Triton launch.

    ok, why = supports(mode, num_experts, top_k)
    ids, weights = fused_route(logits, k, mode, renormalize, scaling, n_group, topk_group,
                               correction_bias=None, out_ids=None, out_weights=None)

Semantics are those of qmoe.routing.route (the reference), for every mode in MODES:
  "softmax"         probs = softmax(logits); top-k of probs; (renormalize); x scaling
  "sigmoid_grouped" scores = sigmoid(logits)
  "sqrt_softplus"   scores = sqrt(softplus(logits))  (softplus(x) = x above 20, as torch)
                    for both: select top-k on scores + correction_bias, among the topk_group
                    best of n_group groups when n_group > 1 (group score = sum of its top-2
                    biased scores); weights = the unbiased scores, (renormalized), x scaling.
Outputs are ordered best first by the selection score (descending, as torch.topk); equal
scores go to the lower expert id (keys compare by their bits: -0.0 ranks below +0.0, NaN
above everything, as in torch.topk). All math in fp32.

One program (one warp) takes BLOCK_M token rows and holds them whole in registers as a
[BLOCK_M, groups, experts per group] tile, each dimension padded to a power of two (padding
is never selected). Each expert's key and id are packed into one int64 (order-preserving
bits of the fp32 key, then E_padded - id), so each of the k picks is ONE max reduction, and
the pick is the only lane equal to it: at decode a row's latency is its chain of k
dependent warp reductions. The kernel reads each logit once and writes 8 bytes per pick;
sizes depend only on M and the spec: no host synchronization, CUDA-graph capturable.
On an H100 inside a CUDA graph: 2.0 us per call at M = 1 for gpt-oss-120b (PyTorch: 18.6 us),
3.3 us for deepseek-v3 (PyTorch: 49 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODES = ("softmax", "sigmoid_grouped", "sqrt_softplus")
MAX_EXPERTS = 512
MAX_TOP_K = 16
ROWS_ONE_PER_PROGRAM = 1024
"""Up to this many rows, one row per program (see launch_config)."""
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Dtypes of logits and correction bias the kernel loads (each converted to fp32 on load)."""

_SOFTMAX = tl.constexpr(0)
_SIGMOID = tl.constexpr(1)
_SQRT_SOFTPLUS = tl.constexpr(2)
_SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch.nn.functional.softplus: x itself above this
_NOTHING = tl.constexpr(-(2 ** 63))       # a packed (key, id) below every real one
_RENORM_EPS = tl.constexpr(1e-20)         # qmoe.routing.reference.RENORM_EPS


@triton.jit
def _pack(key, lo):
    """int64 (order-preserving int of fp32 key) << 32 | lo (0 <= lo < 2^32): one max over packed
    values finds the largest key and, among equal keys, the largest lo, in one reduction."""
    i = key.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, i ^ 0x7FFFFFFF, i)
    return (i.to(tl.int64) << 32) | lo


@triton.jit
def _key_of(packed):
    i = (packed >> 32).to(tl.int32)
    i = tl.where(i < 0, i ^ 0x7FFFFFFF, i)
    return i.to(tl.float32, bitcast=True)


@triton.jit
def _lo_of(packed):
    return (packed - ((packed >> 32) << 32)).to(tl.int32)


@triton.jit
def _score(x, MODE: tl.constexpr):
    """sigmoid(x) or sqrt(softplus(x)), fp32."""
    if MODE == _SIGMOID:
        return tl.sigmoid(x)
    # softplus = max(x, 0) + log1p(exp(-|x|)), with log1p(u) = log(w) * u / (w - 1), w = 1 + u:
    # full precision for small u, where log(1 + u) would lose it (Goldberg)
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    lp = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.sqrt(tl.where(x > _SOFTPLUS_THRESHOLD, x, tl.maximum(x, 0.0) + lp))


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, M, stride_lm, stride_le, stride_b,
                  n_group, group_size, scaling,
                  MODE: tl.constexpr, K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GROUPED: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    grp = tl.arange(0, BLOCK_G)
    row_ok = rows < M
    g3 = grp[None, :, None]
    p3 = tl.arange(0, BLOCK_E)[None, None, :]
    expert = g3 * group_size + p3                             # [1, BG, BE] expert id where valid
    valid = (g3 < n_group) & (p3 < group_size)                # [1, BG, BE] a real expert
    row_off = rows.to(tl.int64) * stride_lm
    x = tl.load(logits_ptr + row_off[:, None, None] + expert * stride_le,
                mask=row_ok[:, None, None] & valid, other=0.0).to(tl.float32)
    neg = float("-inf")

    if MODE == _SOFTMAX:
        xm = tl.where(valid, x, neg)
        e = tl.where(valid, tl.exp(xm - tl.max(tl.max(xm, axis=2), axis=1)[:, None, None]), 0.0)
        key = e / tl.sum(tl.sum(e, axis=2), axis=1)[:, None, None]   # probs: selection key and weight
    else:
        key = _score(x, MODE)
        if HAS_BIAS:  # selection on score + bias, weights from the score alone (reloaded below)
            key += tl.load(bias_ptr + expert * stride_b, mask=valid, other=0.0).to(tl.float32)

    # an expert's packed value: (key, BG * BE - id), distinct per expert; ties go to the lower id
    none = BLOCK_G * BLOCK_E
    lo = (none - expert).to(tl.int64)
    if GROUPED:
        # group score = sum of the group's top-2 keys; keep the TOPK_GROUP best groups
        packed = tl.where(valid, _pack(key, lo), _NOTHING)
        best1 = tl.max(packed, axis=2)                                            # [BM, BG]
        gscore = _key_of(best1)
        if GROUP_TOP2:
            gscore += _key_of(tl.max(tl.where(packed == best1[:, :, None], _NOTHING, packed), axis=2))
        gvalid = grp[None, :] < n_group
        gpacked = tl.where(gvalid, _pack(gscore, (BLOCK_G - grp)[None, :].to(tl.int64)), _NOTHING)
        kept = tl.zeros([BLOCK_M, BLOCK_G], dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            hit_g = gpacked == tl.max(gpacked, axis=1)[:, None]
            kept = tl.where(hit_g, 1, kept)
            gpacked = tl.where(hit_g, _NOTHING, gpacked)
        key = tl.where(kept[:, :, None] != 0, key, neg)

    # top-k: K rounds of one int64 max each; the pick (the only lane equal to the max) drops out
    kcol = tl.arange(0, BLOCK_K)[None, :]
    top_w = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    top_id = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    packed = tl.where(valid, _pack(key, lo), _NOTHING)
    for j in tl.static_range(K):
        best = tl.max(tl.max(packed, axis=2), axis=1)
        packed = tl.where(packed == best[:, None, None], _NOTHING, packed)
        top_id = tl.where(kcol == j, (none - _lo_of(best))[:, None], top_id)
        if not HAS_BIAS:
            top_w = tl.where(kcol == j, _key_of(best)[:, None], top_w)
    kmask = row_ok[:, None] & (kcol < K)
    if HAS_BIAS:
        xk = tl.load(logits_ptr + row_off[:, None] + top_id * stride_le, mask=kmask, other=0.0)
        top_w = tl.where(kcol < K, _score(xk.to(tl.float32), MODE), 0.0)
    if RENORMALIZE:  # the padding columns hold 0; sigmoid / sqrt-softplus add RENORM_EPS (see reference)
        if MODE == _SOFTMAX:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        else:
            top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + _RENORM_EPS)
    top_w = top_w * scaling

    out = rows[:, None].to(tl.int64) * K + kcol
    tl.store(ids_ptr + out, top_id, mask=kmask)
    tl.store(w_ptr + out, top_w, mask=kmask)


def supports(mode: str, num_experts: int, top_k: int) -> tuple[bool, str]:
    """(ok, reason): whether fused_route runs this routing; never raises."""
    if mode not in MODES:
        return False, f"routing mode {mode!r} is not one of {', '.join(MODES)}"
    if num_experts > MAX_EXPERTS:
        return False, f"num_experts {num_experts} > {MAX_EXPERTS}, the most one program holds in registers"
    if top_k > MAX_TOP_K:
        return False, f"top_k {top_k} > {MAX_TOP_K} (the kernel unrolls one reduction per pick)"
    return True, f"fused Triton routing kernel ({mode}, one launch)"


def fused_route(logits: torch.Tensor, k: int, mode: str, renormalize: bool, scaling: float,
                n_group: int = 1, topk_group: int = 1, correction_bias: torch.Tensor | None = None,
                out_ids: torch.Tensor | None = None, out_weights: torch.Tensor | None = None):
    """Top-k experts per token, in one kernel launch (semantics of qmoe.routing.route).

    Shapes, types and devices are the caller's to check (qmoe.routing.check_inputs); this
    entry checks the kernel's own parameters.
    logits: [M, E] fp32 / bf16 / fp16 / fp64, any strides; computed in fp32
    k: experts per token, 1 <= k <= min(E, MAX_TOP_K); E <= MAX_EXPERTS
    mode: one of MODES; renormalize: divide the k weights by their sum; scaling: then
        multiply by this (routed_scaling_factor)
    n_group, topk_group: group-limited selection ("sigmoid_grouped", "sqrt_softplus"; E a
        multiple of n_group; 1 = no limit); ignored by "softmax"
    correction_bias: [E] float or None, on logits' device; added to the scores for selection
        only; ignored by "softmax"
    out_ids: [M, k] int32 contiguous or None; out_weights: [M, k] fp32 contiguous or None:
        written in place when given (CUDA graphs)
    Returns (topk_ids int32 [M, k], topk_weights fp32 [M, k]), best first.
    """
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits: expected dtype float32, bfloat16, float16 or float64, got {logits.dtype}")
    M, E = logits.shape
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if E > MAX_EXPERTS:
        raise ValueError(f"logits: expected at most {MAX_EXPERTS} experts (columns), got {E}")
    if not (isinstance(k, int) and 1 <= k <= min(E, MAX_TOP_K)):
        raise ValueError(f"k: expected an int in [1, {min(E, MAX_TOP_K)}] (E = {E}, at most {MAX_TOP_K}), "
                         f"got {k!r}")
    if not (isinstance(n_group, int) and n_group >= 1 and E % n_group == 0):
        raise ValueError(f"n_group: expected a positive divisor of E ({E}), got {n_group!r}")
    if not (isinstance(topk_group, int) and 1 <= topk_group <= n_group):
        raise ValueError(f"topk_group: expected 1 <= topk_group <= n_group ({n_group}), got {topk_group!r}")
    dev = logits.device
    has_bias = correction_bias is not None and mode != "softmax"
    if correction_bias is not None and correction_bias.dtype not in LOGIT_DTYPES:
        raise ValueError(f"correction_bias: expected dtype float32, bfloat16, float16 or float64, "
                         f"got {correction_bias.dtype}")
    out_ids = _out("out_ids", out_ids, (M, k), torch.int32, dev)
    out_weights = _out("out_weights", out_weights, (M, k), torch.float32, dev)
    if M == 0:
        return out_ids, out_weights

    grouped = mode != "softmax" and n_group > 1
    groups = n_group if grouped else 1
    group_size = E // groups
    BG, BE = triton.next_power_of_2(groups), triton.next_power_of_2(group_size)
    BM, num_warps = launch_config(M, BG * BE)
    bias = correction_bias if has_bias else logits  # absent pointer: never read
    _route_kernel[(triton.cdiv(M, BM),)](
        logits, bias, out_ids, out_weights, M, logits.stride(0), logits.stride(1),
        correction_bias.stride(0) if has_bias else 0, groups, group_size, float(scaling),
        MODE=MODES.index(mode), K=k, RENORMALIZE=bool(renormalize), HAS_BIAS=has_bias,
        GROUPED=grouped, TOPK_GROUP=topk_group if grouped else 1, GROUP_TOP2=group_size >= 2,
        BLOCK_M=BM, BLOCK_G=BG, BLOCK_E=BE, BLOCK_K=triton.next_power_of_2(k), num_warps=num_warps)
    return out_ids, out_weights


def launch_config(M: int, padded_experts: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for M rows of padded_experts logits each.

    From an H100 sweep (M = 1..8192, E = 128..512): one warp per program is fastest or within
    0.2 us everywhere (every reduction stays inside the warp); one row per program up to
    ROWS_ONE_PER_PROGRAM rows (rows in parallel: a row's latency is its k dependent
    reductions), beyond that up to 512 logits per program (fewer, fuller programs).
    """
    BM = 1
    if M > ROWS_ONE_PER_PROGRAM:
        BM = max(1, min(triton.next_power_of_2(triton.cdiv(M, ROWS_ONE_PER_PROGRAM)), 512 // padded_experts))
    return BM, 1


def _out(name, t, shape, dtype, device):
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype \
            or t.device != device or not t.is_contiguous():
        got = (f"{list(t.shape)} {t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}"
               if isinstance(t, torch.Tensor) else type(t).__name__)
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {list(shape)} on {device}, "
                         f"got {got}")
    return t


__all__ = ["LOGIT_DTYPES", "MAX_EXPERTS", "MAX_TOP_K", "MODES", "fused_route", "supports"]
