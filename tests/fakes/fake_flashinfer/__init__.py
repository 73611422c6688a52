"""Fake `flashinfer` packages reproducing FlashInfer's API generations, for CPU tests.

`install(monkeypatch, version)` puts a fake package into sys.modules for one test (the
monkeypatch undoes it). Each generation has the real release's signatures (parameter
names and order, keyword-only markers), return conventions (lists from the CUTLASS and
trtllm ops, a tensor from CuTe-DSL), feature presence (interleave helpers from 0.6.10,
routed MXINT4 from 0.6.15, (ids, weights) routing tuples and quant_mode="w4a16" from
0.6.18) and SM90 layout generation (0.6.10-0.6.15 / 0.6.16.post3-0.6.17: gen 1; 0.6.16 and
0.6.18+: gen 2), as read from the released wheels. Every fake kernel refuses positional
arguments, checks dtypes and padding like the real one, decodes the layout its own
helpers made and computes the MoE in fp32 torch on the CPU.
"""

import inspect
import logging
import sys
import types
from dataclasses import dataclass

import torch

from qmoe.formats._fp4 import e2m1_decode, unpack_nibbles
from qmoe.formats.int4 import codes_to_int

from . import _layouts as L

_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Gen:
    version: str
    cutlass: str            # signature generation of cutlass_fused_moe, see _CUTLASS_SIGS
    sm90_layout: int | None  # None: no interleave helpers
    bf16_only: bool         # W4A16 takes bf16 activations only (>= 0.6.16)
    routed_tuple: bool      # trtllm fp4 routed op accepts (ids, weights)
    mxint4_routed: bool
    fp4_recipe: str | None  # prepare_trtllm_fp4_weights: None | "nvfp4" | "variant" | "quant"
    int4_recipe: bool
    cute: str               # cute_dsl_fused_moe_nvfp4 signature generation
    new_quant_module: bool  # flashinfer.quantization.fp4_quantization exists
    debug_logging: bool = False
    commit: str | None = None


GENERATIONS = {
    "0.6.4": Gen("0.6.4", "a", None, False, False, False, None, False, "a", False),
    "0.6.8": Gen("0.6.8", "b", None, False, False, False, None, False, "b", False),
    "0.6.11": Gen("0.6.11", "b", 1, False, False, False, None, False, "b", True, debug_logging=True),
    "0.6.16": Gen("0.6.16", "d", 2, True, False, True, "nvfp4", False, "c", True),
    "0.6.17": Gen("0.6.17", "e", 1, True, False, True, "nvfp4", False, "c", True),
    "0.6.18.post1": Gen("0.6.18.post1", "d", 2, True, True, True, "variant", True, "d", True,
                        commit="0f1e2d3c"),
    "0.7.2": Gen("0.7.2", "f", 2, True, True, True, "quant", True, "d", True, commit="a1b2c3d4"),
}


# --- signatures -------------------------------------------------------------------------------------
def _sig(items, kwonly=()):
    ps = []
    for it in items:
        name, default = (it, _EMPTY) if isinstance(it, str) else it
        ps.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    for name, default in kwonly:
        ps.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(ps)


def _keywords_only(sig, impl, name):
    """A function with signature `sig` that refuses positional calls (qmoe must call FlashInfer
    with keywords: parameters move between releases) and calls impl(**all arguments)."""
    def fn(*args, **kwargs):
        if args:
            raise AssertionError(f"fake flashinfer: {name} called with {len(args)} positional argument(s)")
        bound = sig.bind(**kwargs)  # TypeError on unknown or missing names, like the real one
        bound.apply_defaults()
        return impl(**bound.arguments)
    fn.__signature__ = sig
    fn.__name__ = name
    return fn


_CUTLASS_HEAD = ["input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
                 "fc2_expert_weights", "output_dtype", "quant_scales", ("fc1_expert_biases", None),
                 ("fc2_expert_biases", None), ("input_sf", None), ("swiglu_alpha", None), ("swiglu_beta", None),
                 ("swiglu_limit", None), ("tp_size", 1), ("tp_rank", 0), ("ep_size", 1), ("ep_rank", 0),
                 ("cluster_size", 1), ("cluster_rank", 0), ("output", None), ("enable_alltoall", False),
                 ("use_deepseek_fp8_block_scale", False), ("use_w4_group_scaling", False),
                 ("use_mxfp8_act_scaling", False), ("min_latency_mode", False), ("use_packed_weights", False)]
_TAIL = [("tune_max_num_tokens", 8192), ("enable_pdl", None), ("activation_type", "Swiglu")]
_HUMMING = [("use_wfp4afp8_humming", False)]
_CUTLASS_SIGS = {
    "a": _sig(_CUTLASS_HEAD + _TAIL),                                                   # 0.6.4
    "b": _sig(_CUTLASS_HEAD + _TAIL + [("swizzled_input_sf", True)]),                    # 0.6.8 - 0.6.11
    "d": _sig(_CUTLASS_HEAD + _HUMMING + _TAIL + [("swizzled_input_sf", True), ("use_fused_finalize", True),
              ("profile_ids", None), ("workspace_buffer", None)]),                     # 0.6.16, 0.6.18
    "e": _sig(_CUTLASS_HEAD + _TAIL + [("swizzled_input_sf", True), ("use_fused_finalize", True),
              ("profile_ids", None), ("workspace_buffer", None)]),                     # 0.6.16.post3, 0.6.17
    "f": _sig(_CUTLASS_HEAD + _HUMMING + _TAIL + [("swizzled_input_sf", True), ("use_fused_finalize", True),
              ("profile_ids", None), ("workspace_buffer", None)],
              kwonly=[("clamped_relu2_limit", None), ("situ_beta", None), ("situ_linear_beta", None),
                      ("backend", "cutlass")]),                                           # 0.7.2
}

_TRT_MID = ["gemm1_weights", "gemm1_weights_scale"]
_FP4_ROUTED = _sig(["topk_ids", "routing_bias", "hidden_states", "hidden_states_scale", "gemm1_weights",
                    "gemm1_weights_scale", "gemm1_bias", "gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit",
                    "gemm2_weights", "gemm2_weights_scale", "gemm2_bias", "output1_scale_scalar",
                    "output1_scale_gate_scalar", "output2_scale_scalar", "num_experts", "top_k", "n_group",
                    "topk_group", "intermediate_size", "local_expert_offset", "local_num_experts",
                    "routed_scaling_factor", ("routing_method_type", 0), ("do_finalize", True),
                    ("enable_pdl", None), ("activation_type", 3), ("per_token_scale", None), ("output", None),
                    ("tune_max_num_tokens", 8192)])
_INT4_ROUTED = _sig(["topk_ids", "hidden_states", "gemm1_weights", "gemm1_weights_scale", "gemm1_alpha",
                     "gemm1_beta", "gemm1_clamp_limit", "gemm2_weights", "gemm2_weights_scale", "num_experts",
                     "top_k", "n_group", "topk_group", "intermediate_size", "local_expert_offset",
                     "local_num_experts", "routed_scaling_factor", ("routing_method_type", 0),
                     ("do_finalize", True), ("enable_pdl", None), ("gemm1_lora_delta", None), ("output", None),
                     ("tune_max_num_tokens", 8192)])
_CUTE_HEAD = ["x", "x_sf", "token_selected_experts", "token_final_scales", "w1_weight", "w1_weight_sf",
              "w1_alpha", "fc2_input_scale", "w2_weight", "w2_weight_sf", "w2_alpha", "num_experts", "top_k",
              ("num_local_experts", None), ("local_expert_offset", 0), ("output_dtype", torch.bfloat16),
              ("use_fused_finalize", True), ("moe_output", None), ("aux_stream", None)]
_SWIGLU = [("activation_type", 3), ("swiglu_alpha", 1.0), ("swiglu_beta", 0.0),
           ("swiglu_limit", torch.finfo(torch.float32).max)]
_CUTE_SIGS = {
    "a": _sig(_CUTE_HEAD),                                                               # 0.6.4
    "b": _sig(_CUTE_HEAD + [("enable_pdl", True)]),                                      # 0.6.8 - 0.6.11
    "c": _sig(_CUTE_HEAD + [("enable_pdl", True)] + _SWIGLU, kwonly=[("per_token_scale", None)]),  # 0.6.16
    "d": _sig(_CUTE_HEAD + [("enable_pdl", True)] + _SWIGLU + [("situ_beta", None), ("situ_linear_beta", None)],
              kwonly=[("quant_mode", "w4a4"), ("per_token_scale", None)]),                # 0.6.18+
}


# --- shared MoE math ------------------------------------------------------------------------------
def _moe(x, ids, weights, w13, w2, b13, b2, act, out):
    """x [M, Hp] float; ids/weights [M, k]; w13 [E, 2Ip, Hp] rows [up; gate]; w2 [E, Hp, Ip];
    act: (alpha, beta, limit) or None for plain SiLU-GLU. Writes out (bf16) and returns it."""
    M, k = ids.shape
    E = w13.shape[0]
    if ids.min() < 0 or ids.max() >= E:
        raise RuntimeError(f"fake kernel: expert ids must lie in [0, {E}), got [{int(ids.min())}, {int(ids.max())}]")
    Ip = w13.shape[1] // 2
    acc = torch.zeros(M, w2.shape[1], dtype=torch.float32)
    xf = x.float()
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = xf[tok] @ w13[e].T
        if b13 is not None:
            h = h + b13[e].float()
        up, gate = h[:, :Ip], h[:, Ip:]
        if act is None:
            a = up * gate * torch.sigmoid(gate)
        else:
            alpha, beta, limit = act
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            a = (up + beta) * gate * torch.sigmoid(alpha * gate)
        y = a.to(torch.bfloat16).float() @ w2[e].T
        if b2 is not None:
            y = y + b2[e].float()
        acc.index_add_(0, tok, y * weights[tok, slot].float().unsqueeze(1))
    out.copy_(acc)
    return out


def _fp4(data, scales_f, block):
    """data [..., N, K/2] uint8, scales_f [..., N, K/block] float -> [..., N, K] float."""
    v = e2m1_decode(unpack_nibbles(data))
    K = v.shape[-1]
    return (v.reshape(*v.shape[:-1], K // block, block) * scales_f.unsqueeze(-1)).reshape(v.shape)


def _e8m0(b):
    return torch.exp2(b.float() - 127.0)


def _act_of(alpha, beta, limit, E):
    """Per-expert activation tensors -> one (alpha, beta, limit) tuple (None if all absent)."""
    given = [t is not None for t in (alpha, beta, limit)]
    if not any(given):
        return None
    if not all(given):
        raise RuntimeError("fake kernel: swiglu alpha, beta and limit must be given together")
    for t in (alpha, beta, limit):
        if t.dtype != torch.float32 or tuple(t.shape) != (E,):
            raise RuntimeError(f"fake kernel: swiglu parameters must be fp32 [{E}], got {t.dtype} {list(t.shape)}")
    return float(alpha[0]), float(beta[0]), float(limit[0])


# --- the package ----------------------------------------------------------------------------------------
class Fake:
    """One installed fake: its modules and a log of kernel calls (name, number of tokens)."""

    def __init__(self, gen: Gen):
        self.gen = gen
        self.calls = []
        self.modules = {}
        self._build()

    def _module(self, name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        self.modules[name] = m
        return m

    def _build(self):
        g = self.gen
        top = self._module("flashinfer", __version__=g.version)
        if g.commit:
            top.__git_commit__ = g.commit
        fm = self._module("flashinfer.fused_moe")
        core = self._module("flashinfer.fused_moe.core")
        top.fused_moe = fm
        fm.core = core
        fm.cutlass_fused_moe = _keywords_only(_CUTLASS_SIGS[g.cutlass], self.cutlass_fused_moe, "cutlass_fused_moe")
        if g.sm90_layout is not None:
            fm.interleave_moe_weights_for_sm90_mixed_gemm = _keywords_only(
                _sig(["weight", ("quant_type", "fp4")]), self.interleave_weights,
                "interleave_moe_weights_for_sm90_mixed_gemm")
            fm.interleave_moe_scales_for_sm90_mixed_gemm = _keywords_only(
                _sig(["scales", ("group_size", 32)]), self.interleave_scales,
                "interleave_moe_scales_for_sm90_mixed_gemm")
        fm.trtllm_fp4_block_scale_routed_moe = _keywords_only(_FP4_ROUTED, self.trtllm_fp4, "trtllm_fp4_routed")
        if g.mxint4_routed:
            fm.trtllm_mxint4_block_scale_routed_moe = _keywords_only(_INT4_ROUTED, self.trtllm_int4,
                                                                     "trtllm_mxint4_routed")
        fm.cute_dsl_fused_moe_nvfp4 = _keywords_only(_CUTE_SIGS[g.cute], self.cute_dsl, "cute_dsl_fused_moe_nvfp4")
        core._maybe_get_cached_w3_w1_permute_indices = _keywords_only(
            _sig(["_cache_permute_indices", "dst_w3_w1_weight", "epilogue_tile_m", ("num_elts_per_sf", None),
                  ("is_gated_act_gemm", True)]), self.w3w1_permute, "_maybe_get_cached_w3_w1_permute_indices")
        core.get_w2_permute_indices_with_cache = _keywords_only(
            _sig(["_cache_permute_indices", "dst_w2_weight", "epilogue_tile_m", ("num_elts_per_sf", None)]),
            self.w2_permute, "get_w2_permute_indices_with_cache")
        core.convert_to_block_layout = _keywords_only(
            _sig(["input_tensor", "blockK"]), lambda input_tensor, blockK: L.to_blocks(input_tensor, blockK),
            "convert_to_block_layout")
        if g.routed_tuple:
            core._split_precomputed_routing = lambda topk_ids: topk_ids
        bsi = _keywords_only(_sig(["unswizzled_sf"]), lambda unswizzled_sf: L.block_swizzle(unswizzled_sf),
                             "block_scale_interleave")
        self._module("flashinfer.fp4_quantization", block_scale_interleave=bsi)
        if g.new_quant_module:
            self._module("flashinfer.quantization")
            self._module("flashinfer.quantization.fp4_quantization", block_scale_interleave=bsi)
        prep = self._module("flashinfer.fused_moe.prepare")
        fm.prepare = prep
        if g.fp4_recipe:
            extra = {"nvfp4": [], "variant": [("variant", None)], "quant": [("quant", None)]}[g.fp4_recipe]
            prep.prepare_trtllm_fp4_weights = _keywords_only(
                _sig(["w1_bf16", "w2_bf16"], kwonly=extra + [("num_local_experts", None)]),
                self.not_for_qmoe, "prepare_trtllm_fp4_weights")
        if g.int4_recipe:
            prep.prepare_trtllm_mxint4_weights = _keywords_only(
                _sig(["w1_bf16", "w2_bf16"], kwonly=[("num_local_experts", None)]),
                self.not_for_qmoe, "prepare_trtllm_mxint4_weights")
        if g.cute in ("c", "d"):
            prep._interleave_linear_and_gate = _keywords_only(
                _sig(["x", ("group_size", 64), ("dim", -1)]),
                lambda x, group_size, dim: L.interleave_linear_gate(x, group_size, dim), "_interleave_linear_and_gate")
        self._module("flashinfer.cute_dsl")
        self._module("flashinfer.cute_dsl.utils", convert_sf_to_mma_layout=_keywords_only(
            _sig(["sf", "m", "k", ("num_groups", 1), ("sf_vec_size", 16)]),
            lambda sf, m, k, num_groups, sf_vec_size: L.mma_layout(sf, m, k, num_groups, sf_vec_size),
            "convert_sf_to_mma_layout"))

    @staticmethod
    def not_for_qmoe(**kw):
        raise AssertionError("fake flashinfer: qmoe must prepare layouts from its own codes, not call "
                             "FlashInfer's bf16 preparation functions")

    # --- layout helpers ---------------------------------------------------------------------
    def interleave_weights(self, weight, quant_type):
        if weight.dtype != torch.uint8 or weight.dim() != 3:
            raise ValueError(f"weight must be 3D uint8, got {weight.dtype} {list(weight.shape)}")
        if quant_type != "fp4":
            raise ValueError(f"fake: quant_type {quant_type!r}")
        return L.sm90_weights(weight.contiguous(), self.gen.sm90_layout)

    def interleave_scales(self, scales, group_size):
        if scales.dtype != torch.uint8 or group_size != 32:
            raise ValueError(f"scales must be uint8 E8M0 with group_size 32, got {scales.dtype}, {group_size}")
        return L.sm90_scales(scales, self.gen.sm90_layout)

    def w3w1_permute(self, _cache_permute_indices, dst_w3_w1_weight, epilogue_tile_m, num_elts_per_sf,
                     is_gated_act_gemm):
        assert epilogue_tile_m == 128 and dst_w3_w1_weight.dim() == 2
        key = ("w3_w1", tuple(dst_w3_w1_weight.shape), num_elts_per_sf, is_gated_act_gemm)
        if key not in _cache_permute_indices:
            _cache_permute_indices[key] = L.w3w1_rows(dst_w3_w1_weight.shape[0], num_elts_per_sf, is_gated_act_gemm)
        return _cache_permute_indices[key]

    def w2_permute(self, _cache_permute_indices, dst_w2_weight, epilogue_tile_m, num_elts_per_sf):
        assert epilogue_tile_m == 128 and dst_w2_weight.dim() == 2
        return L.w2_rows(dst_w2_weight.shape[0], num_elts_per_sf)

    # --- kernels --------------------------------------------------------------------------------
    def cutlass_fused_moe(self, **a):
        g = self.gen
        if not a["use_w4_group_scaling"]:
            raise AssertionError("fake: only the W4A16 (use_w4_group_scaling=True) path is modelled")
        x, w13, w2, out = a["input"], a["fc1_expert_weights"], a["fc2_expert_weights"], a["output"]
        if g.bf16_only and x.dtype != torch.bfloat16:
            raise RuntimeError(f"W4A16 takes bf16 activations, got {x.dtype}")
        if w13.dtype != torch.uint8 or w2.dtype != torch.uint8:
            raise RuntimeError("W4A16 weights must be uint8")
        E, two_ip, hb = w13.shape
        Hp, Ip = hb * 2, two_ip // 2
        if Hp % 128 or Ip % 128:
            raise RuntimeError(f"SM90 mixed GEMM needs hidden and intermediate sizes padded to 128, got {Hp}, {Ip}")
        if x.shape[1] != Hp or tuple(w2.shape) != (E, Hp, Ip // 2):
            raise RuntimeError(f"shape mismatch: input {list(x.shape)}, fc1 {list(w13.shape)}, fc2 {list(w2.shape)}")
        if out is None:
            out = torch.empty(x.shape[0], Hp, dtype=a["output_dtype"])
        if tuple(out.shape) != (x.shape[0], Hp) or out.dtype != a["output_dtype"]:
            raise RuntimeError(f"output: expected {a['output_dtype']} [{x.shape[0]}, {Hp}], got {out.dtype} "
                               f"{list(out.shape)}")
        b13, b2 = a["fc1_expert_biases"], a["fc2_expert_biases"]
        if (b13 is None) != (b2 is None):
            raise RuntimeError("fc1 and fc2 biases must be given together")
        if b13 is not None and (b13.dtype != a["output_dtype"] or b2.dtype != a["output_dtype"]):
            raise RuntimeError(f"biases must be in the output dtype {a['output_dtype']}, got {b13.dtype}")
        qs = a["quant_scales"]
        if not isinstance(qs, list) or len(qs) != 2 or any(t.dtype != torch.int32 for t in qs):
            raise RuntimeError("quant_scales must be [fc1 scales, fc2 scales] as int32 views")
        self.calls.append(("cutlass_fused_moe", x.shape[0]))
        lay = g.sm90_layout or 1
        s13 = L.sm90_scales_inverse(qs[0].view(torch.uint8), lay, two_ip, Hp // 32)
        s2 = L.sm90_scales_inverse(qs[1].view(torch.uint8), lay, Hp, Ip // 32)
        W13 = _fp4(L.sm90_weights_inverse(w13, lay), _e8m0(s13), 32)
        W2 = _fp4(L.sm90_weights_inverse(w2, lay), _e8m0(s2), 32)
        act = _act_of(a["swiglu_alpha"], a["swiglu_beta"], a["swiglu_limit"], E)
        _moe(x, a["token_selected_experts"], a["token_final_scales"], W13, W2, b13, b2, act, out)
        return [out, torch.zeros(1), torch.zeros(1), torch.zeros(1)]  # a list in every release

    def _routing(self, topk_ids, tuple_ok):
        if isinstance(topk_ids, tuple):
            if not tuple_ok:
                raise TypeError("this release takes packed int32 topk_ids only")
            return topk_ids
        if topk_ids.dtype != torch.int32:
            raise RuntimeError(f"packed topk_ids must be int32, got {topk_ids.dtype}")
        ids = topk_ids >> 16
        low = topk_ids & 0xFFFF
        w = torch.where(low >= 0x8000, low - 0x10000, low).to(torch.int16).view(torch.bfloat16).float()
        return ids, w

    def _trt_common(self, a, pad):
        x, out = a["hidden_states"], a["output"]
        E = a["num_experts"]
        if x.dtype != torch.bfloat16:
            raise RuntimeError(f"hidden_states must be bf16 for W4A16, got {x.dtype}")
        Hp, Ip = x.shape[1], a["intermediate_size"]
        if Hp % pad or Ip % pad:
            raise RuntimeError(f"hidden and intermediate sizes must be multiples of {pad}, got {Hp}, {Ip}")
        if out is None or tuple(out.shape) != (x.shape[0], Hp) or out.dtype != torch.bfloat16:
            raise RuntimeError("output must be a bf16 [M, hidden] tensor")
        if a["local_num_experts"] != E or a["local_expert_offset"] != 0:
            raise RuntimeError("fake: expert parallelism is not modelled")
        act = _act_of(a["gemm1_alpha"], a["gemm1_beta"], a["gemm1_clamp_limit"], E)
        return x, out, E, Hp, Ip, act

    def trtllm_fp4(self, **a):
        x, out, E, Hp, Ip, act = self._trt_common(a, 128)
        ids, w = self._routing(a["topk_ids"], self.gen.routed_tuple)
        if a["hidden_states_scale"] is not None or a["routing_bias"] is not None:
            raise RuntimeError("fake: bf16 hidden states take no scale and routing is precomputed")
        g1, s1, g2, s2 = a["gemm1_weights"], a["gemm1_weights_scale"], a["gemm2_weights"], a["gemm2_weights_scale"]
        if s1.dtype != torch.float8_e4m3fn or s2.dtype != torch.float8_e4m3fn:
            raise RuntimeError("MXFP4 scales must be E8M0 bytes viewed as float8_e4m3fn")
        for t in (a["output1_scale_scalar"], a["output1_scale_gate_scalar"], a["output2_scale_scalar"]):
            if t is None or not torch.equal(t, torch.ones(E)):
                raise RuntimeError("fake: MXFP4 x bf16 models unit output scales only")
        self.calls.append(("trtllm_fp4_block_scale_routed_moe", x.shape[0]))
        W13, W2, b13, b2 = [], [], None, None
        p13, ps13 = L.w3w1_rows(2 * Ip), L.w3w1_rows(2 * Ip, 16)
        p2, ps2 = L.w2_rows(Hp), L.w2_rows(Hp, 16)
        for e in range(E):
            d = L.unpermute_rows(g1[e], p13)
            s = L.unpermute_rows(L.block_unswizzle(s1[e].view(torch.uint8).reshape(-1), 1, 2 * Ip, Hp // 32)[0], ps13)
            W13.append(_fp4(d, _e8m0(s), 32))
            d = L.unpermute_rows(g2[e], p2)
            s = L.unpermute_rows(L.block_unswizzle(s2[e].view(torch.uint8).reshape(-1), 1, Hp, Ip // 32)[0], ps2)
            W2.append(_fp4(d, _e8m0(s), 32))
        if a["gemm1_bias"] is not None:
            if a["gemm1_bias"].dtype != torch.float32 or a["gemm2_bias"].dtype != torch.float32:
                raise RuntimeError("trtllm biases are fp32")
            b13 = torch.stack([L.unpermute_rows(a["gemm1_bias"][e].reshape(-1, 1), p13)[:, 0] for e in range(E)])
            b2 = torch.stack([L.unpermute_rows(a["gemm2_bias"][e].reshape(-1, 1), p2)[:, 0] for e in range(E)])
        _moe(x, ids, w, torch.stack(W13), torch.stack(W2), b13, b2, act, out)
        return [out] if a["do_finalize"] else [out, w, ids]

    def trtllm_int4(self, **a):
        x, out, E, Hp, Ip, act = self._trt_common(a, 256)
        ids, w = self._routing(a["topk_ids"], False)
        g1, s1, g2, s2 = a["gemm1_weights"], a["gemm1_weights_scale"], a["gemm2_weights"], a["gemm2_weights_scale"]
        if s1.dtype != torch.bfloat16 or s2.dtype != torch.bfloat16:
            raise RuntimeError("MXINT4 scales must be bf16")
        self.calls.append(("trtllm_mxint4_block_scale_routed_moe", x.shape[0]))
        W13, W2 = [], []
        # FlashInfer permutes w13 scales with num_elts_per_sf=32 and w2 scales with 16
        p13, ps13, p2, ps2 = L.w3w1_rows(2 * Ip), L.w3w1_rows(2 * Ip, 32), L.w2_rows(Hp), L.w2_rows(Hp, 16)
        for e in range(E):
            d = L.unpermute_rows(L.from_blocks(g1[e]), p13)
            s = L.unpermute_rows(L.block_unswizzle(s1[e].reshape(-1), 1, 2 * Ip, Hp // 32)[0], ps13)
            W13.append((codes_to_int(unpack_nibbles(d)).float().reshape(2 * Ip, Hp // 32, 32)
                        * s.float().unsqueeze(-1)).reshape(2 * Ip, Hp))
            d = L.unpermute_rows(L.from_blocks(g2[e]), p2)
            s = L.unpermute_rows(L.block_unswizzle(s2[e].reshape(-1), 1, Hp, Ip // 32)[0], ps2)
            W2.append((codes_to_int(unpack_nibbles(d)).float().reshape(Hp, Ip // 32, 32)
                       * s.float().unsqueeze(-1)).reshape(Hp, Ip))
        _moe(x, ids, w, torch.stack(W13), torch.stack(W2), None, None, act, out)
        return [out] if a["do_finalize"] else [out, w, ids]

    def cute_dsl(self, **a):
        if a.get("quant_mode", "w4a4") != "w4a16":
            raise AssertionError("fake: only quant_mode='w4a16' is modelled")
        x, out, E = a["x"], a["moe_output"], a["num_experts"]
        if x.dtype != torch.bfloat16 or a["x_sf"] is not None or a["fc2_input_scale"] is not None:
            raise RuntimeError("w4a16 takes bf16 x without x_sf or fc2_input_scale")
        g1, g2 = a["w1_weight"], a["w2_weight"]
        two_ip, Hp = g1.shape[1], g1.shape[2] * 2
        Ip = two_ip // 2
        if Hp % 128 or Ip % 128:
            raise RuntimeError(f"sizes must be multiples of 128, got {Hp}, {Ip}")
        if out is None or tuple(out.shape) != (x.shape[0], Hp):
            raise RuntimeError("moe_output must be [M, hidden]")
        self.calls.append(("cute_dsl_fused_moe_nvfp4", x.shape[0]))
        d13 = L.deinterleave_linear_gate(g1, 64, 1)
        s13 = L.deinterleave_linear_gate(L.mma_layout_inverse(a["w1_weight_sf"]), 64, 1)
        s2 = L.mma_layout_inverse(a["w2_weight_sf"])

        def e4m3(b):
            return b.contiguous().view(torch.float8_e4m3fn).float()
        W13 = _fp4(d13, e4m3(s13), 16) * a["w1_alpha"].view(E, 1, 1)
        W2 = _fp4(g2, e4m3(s2), 16) * a["w2_alpha"].view(E, 1, 1)
        act = (a["swiglu_alpha"], a["swiglu_beta"], a["swiglu_limit"])
        _moe(x, a["token_selected_experts"], a["token_final_scales"], W13, W2, None, None, act, out)
        return out  # CuTe-DSL returns the tensor itself


def install(monkeypatch, version: str, *, cutlass_dsl: bool = False) -> Fake:
    """Install the fake FlashInfer `version` (a key of GENERATIONS) for the current test.

    Also isolates what qmoe's compat module keeps between calls (the probe cache, the
    logging decision) and FlashInfer's environment variables, and removes
    QMOE_FLASHINFER_FORCE so a test sets it only on purpose.
    """
    fake = Fake(GENERATIONS[version])
    for name in [n for n in sys.modules if n == "flashinfer" or n.startswith("flashinfer.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    if cutlass_dsl:
        monkeypatch.setitem(sys.modules, "cutlass", types.ModuleType("cutlass"))
    elif "cutlass" in sys.modules:
        monkeypatch.delitem(sys.modules, "cutlass")
    isolate(monkeypatch)
    if fake.gen.debug_logging:  # 0.6.11 shipped with debug logging on
        # a logger registered for this test only (loggers are process-global)
        lg = logging.Logger("flashinfer.jit", logging.DEBUG)
        lg.parent = logging.getLogger()
        monkeypatch.setitem(logging.Logger.manager.loggerDict, "flashinfer.jit", lg)
    return fake


def isolate(monkeypatch):
    """Undo, after the test, whatever qmoe's compat module and FlashInfer's logging defaults
    change in the process (environment, compat's caches), and start from a clean state."""
    from qmoe.backends.flashinfer import compat

    for var in ("FLASHINFER_LOGGING_LEVEL", "FLASHINFER_LOGLEVEL", compat.FORCE_ENV):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(compat, "_user_logging", None)
    monkeypatch.setattr(compat, "_loaded", (object(), None, ""))
