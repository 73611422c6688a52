"""The `flashinfer_trtllm` backend: FlashInfer's trtllm-gen fused MoE (SM10x / SM12x), with
qmoe's routing passed in (the `*_routed_moe` entry points), bf16 activations.

  mxfp4: trtllm_fp4_block_scale_routed_moe, MXFP4 weights x bf16 activations
  int4:  trtllm_mxint4_block_scale_routed_moe, int4 group-32 (bf16 scales) x bf16 activations

Layout made by `prepare`, following FlashInfer's own `prepare_trtllm_fp4_weights` /
`prepare_trtllm_mxint4_weights` (fused_moe/prepare.py, 0.6.18+), which quantize bf16
weights themselves; qmoe applies the same steps to its already-quantized codes:

  w13 rows [up; gate] (FlashInfer's documented gated order), H and I padded (mxfp4: 128,
  int4: 256); per expert, rows permuted by FlashInfer's
  `_maybe_get_cached_w3_w1_permute_indices` (gated-activation row interleave + MMA shuffle,
  epilogue tile 128) and w2 rows by `get_w2_permute_indices_with_cache`; scales permuted by
  the same helpers with `num_elts_per_sf` (mxfp4: 16 for both; int4: 32 for w13 and 16 for
  w2, as FlashInfer does) and swizzled by `block_scale_interleave`; int4 codes additionally
  in `convert_to_block_layout(., 128)`. MXFP4 scales are E8M0 bytes viewed as
  float8_e4m3fn; int4 scales stay bf16. Biases (mxfp4 only) are fp32, permuted like rows.

qmoe has not run this path on an SM100 GPU yet: it is gated (see flashinfer.compat.gate)
and runs only with QMOE_FLASHINFER_FORCE=1. NVFP4 weights are not offered here: trtllm-gen
pairs them with NVFP4 activations (W4A4) and global-scale plumbing qmoe does not establish;
use flashinfer_cutedsl (NVFP4 W4A16).
"""

from __future__ import annotations

import torch

from ...spec import MoESpec
from ...weights import ExpertWeights
from . import compat
from ..base import Prepared, Support, finish_output, output_buffer

_FM = "flashinfer.fused_moe"
_CORE = "flashinfer.fused_moe.core"
_PREPARE = "flashinfer.fused_moe.prepare"
EPILOGUE_TILE_M = 128  # trtllm-gen's epilogue tile, a constant of its kernels
BLOCK_K = 128  # int4 codes' block layout along K

_COMMON = ("topk_ids", "hidden_states", "gemm1_weights", "gemm1_weights_scale", "gemm1_alpha",
           "gemm1_beta", "gemm1_clamp_limit", "gemm2_weights", "gemm2_weights_scale", "num_experts",
           "top_k", "n_group", "topk_group", "intermediate_size", "local_expert_offset",
           "local_num_experts", "routed_scaling_factor", "output")
_PATHS = {
    # fmt: (gate path, kernel, its parameters, FlashInfer's recipe (function, one of its params), pad)
    "mxfp4": ("trtllm_mxfp4_w4a16", "trtllm_fp4_block_scale_routed_moe",
              _COMMON + ("routing_bias", "hidden_states_scale", "gemm1_bias", "gemm2_bias",
                         "output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar"),
              ("prepare_trtllm_fp4_weights", ("variant", "quant")), 128),
    "int4": ("trtllm_int4_w4a16", "trtllm_mxint4_block_scale_routed_moe", _COMMON,
             ("prepare_trtllm_mxint4_weights", ()), 256),
}
_W3W1 = ("_maybe_get_cached_w3_w1_permute_indices",
         ("_cache_permute_indices", "dst_w3_w1_weight", "epilogue_tile_m", "num_elts_per_sf", "is_gated_act_gemm"))
_W2 = ("get_w2_permute_indices_with_cache",
       ("_cache_permute_indices", "dst_w2_weight", "epilogue_tile_m", "num_elts_per_sf"))


class FlashInferTrtllmBackend(compat.FlashInferBackend):
    name = "flashinfer_trtllm"

    formats = ("mxfp4", "int4")
    experimental = True

    def format_hint(self, fmt):
        if fmt == "nvfp4":
            return (" (trtllm-gen pairs NVFP4 weights with NVFP4 activations (W4A4), whose global-scale "
                    "plumbing qmoe does not establish; use flashinfer_cutedsl (NVFP4 W4A16))")
        return ""

    def _supports(self, spec, fmt, device) -> Support:
        cap = compat.device_capability(device)
        if cap is None:
            return Support(False, f"needs a CUDA GPU (SM100 / SM12x); device {device} is not one or no GPU "
                                  f"is visible")
        if cap[0] not in (10, 12):
            extra = "; on SM90 use flashinfer_cutlass (MXFP4 W4A16)" if cap == (9, 0) else ""
            return Support(False, f"trtllm-gen MoE kernels need SM10x or SM12x; this GPU is "
                                  f"SM{cap[0]}{cap[1]}{extra}")
        fi, why = compat.load()
        if fi is None:
            return Support(False, why)
        path, kernel, params, (recipe, recipe_params), _ = _PATHS[fmt]
        missing = fi.missing(_FM, kernel, params)
        if missing:
            return Support(False, missing)
        rfn = fi.get(_PREPARE, recipe)
        if rfn is None or (recipe_params and not set(recipe_params) & fi.params(rfn)):
            return Support(False, f"flashinfer {fi.version} documents no {fmt} x bf16 weight preparation for "
                                  f"trtllm-gen (its {recipe} for that appears in 0.6.18), so qmoe cannot "
                                  f"establish the layout the kernel expects")
        for where, (name, ps) in ((_CORE, _W3W1), (_CORE, _W2)):
            missing = fi.missing(where, name, ps)
            if missing:
                return Support(False, missing)
        if fmt == "int4":
            missing = fi.missing(_CORE, "convert_to_block_layout", ("input_tensor", "blockK"))
            if missing:
                return Support(False, missing)
        if compat.block_scale_interleave_place(fi) is None:
            return Support(False, f"flashinfer {fi.version} has no block_scale_interleave")
        if fmt == "int4" and spec.bias:
            return Support(False, "trtllm_mxint4_block_scale_routed_moe takes no biases; this layer has them")
        return self._gated(path, fi, f"flashinfer {fi.version} trtllm-gen {kernel} ({fmt} weights, bf16 activations)")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        fmt = weights.format
        if fmt == "int4" and weights.has_bias:
            raise ValueError("weights: trtllm_mxint4_block_scale_routed_moe takes no biases; these weights have them")
        fi, _ = compat.load()
        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        pad = _PATHS[fmt][4]
        Hp, Ip = compat.padded(H, pad), compat.padded(I, pad)
        cache = {}
        bsi_where = compat.block_scale_interleave_place(fi)

        def w3w1(t, **kw):
            return fi.call(_CORE, _W3W1[0], {"_cache_permute_indices": cache, "dst_w3_w1_weight": t,
                                             "epilogue_tile_m": EPILOGUE_TILE_M, **kw})

        def w2rows(t, **kw):
            return fi.call(_CORE, _W2[0], {"_cache_permute_indices": cache, "dst_w2_weight": t,
                                           "epilogue_tile_m": EPILOGUE_TILE_M, **kw})

        def swizzle(s):
            return fi.call(bsi_where, "block_scale_interleave", {"unswizzled_sf": s.contiguous()})

        def blocked(w):
            if fmt != "int4":
                return w.contiguous()
            return fi.call(_CORE, "convert_to_block_layout", {"input_tensor": w.contiguous(), "blockK": BLOCK_K})

        # scales are permuted and swizzled as raw bytes (mxfp4) or bf16 (int4), as FlashInfer does
        one = 127 if fmt == "mxfp4" else 1.0
        q13, q2 = weights.w13, weights.w2
        d13 = compat.pad_last2(compat.up_gate(q13.data, Ip), 2 * Ip, Hp // 2)
        s13 = compat.pad_last2(compat.up_gate(q13.scales, Ip, one), 2 * Ip, Hp // 32, one)
        d2 = compat.pad_last2(q2.data, Hp, Ip // 2)
        s2 = compat.pad_last2(q2.scales, Hp, Ip // 32, one)
        sf13, sf2 = (16, 16) if fmt == "mxfp4" else (32, 16)
        parts = {k: [] for k in ("w13", "s13", "w2", "s2", "b13", "b2")}
        for e in range(E):
            parts["w13"].append(blocked(d13[e][w3w1(d13[e], is_gated_act_gemm=True).to(d13.device)]))
            p = w3w1(s13[e], num_elts_per_sf=sf13, is_gated_act_gemm=True).to(s13.device)
            parts["s13"].append(swizzle(s13[e][p]))
            parts["w2"].append(blocked(d2[e][w2rows(d2[e]).to(d2.device)]))
            parts["s2"].append(swizzle(s2[e][w2rows(s2[e], num_elts_per_sf=sf2).to(s2.device)]))
        t = {k: torch.stack(v) for k, v in parts.items() if v}
        if fmt == "mxfp4":
            t["s13"] = t["s13"].reshape(E, 2 * Ip, Hp // 32).view(torch.float8_e4m3fn)
            t["s2"] = t["s2"].reshape(E, Hp, Ip // 32).view(torch.float8_e4m3fn)
            ones = torch.ones(E, dtype=torch.float32, device=weights.device)
            t["scale_c1"], t["scale_gate1"], t["scale_c2"] = ones, ones.clone(), ones.clone()
            if weights.has_bias:
                dev = weights.device
                b13 = weights.b13 if weights.b13 is not None else torch.zeros(E, 2 * I, device=dev)
                b2 = weights.b2 if weights.b2 is not None else torch.zeros(E, H, device=dev)
                b13 = compat.up_gate(b13.float(), Ip)
                b2 = compat.pad_last2(b2.float().unsqueeze(1), 1, Hp)[:, 0]
                t["b13"] = torch.stack([b13[e][w3w1(b13[e].reshape(-1, 1), is_gated_act_gemm=True).to(dev)]
                                        for e in range(E)])
                t["b2"] = torch.stack([b2[e][w2rows(b2[e].reshape(-1, 1)).to(dev)] for e in range(E)])
        act = spec.activation
        if (act.alpha, act.beta, act.limit) != (1.0, 0.0, None):
            lim = torch.finfo(torch.float32).max if act.limit is None else act.limit
            for k, v in (("alpha", act.alpha), ("beta", act.beta), ("limit", lim)):
                t[k] = torch.full((E,), float(v), dtype=torch.float32, device=weights.device)
        compat.quiet_logging()
        meta = {**compat.stamp(fi), "hidden_size": H, "hidden_padded": Hp, "intermediate_padded": Ip,
                # 0.6.18 added (ids, weights) tuples to the fp4 routed op; older ones take packed int32
                "routing_tuple": fmt == "mxfp4" and fi.get(_CORE, "_split_precomputed_routing") is not None}
        return Prepared(self.name, spec, fmt, weights.device, t, meta)

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        """x: [M, H] bf16 (fp16 / fp32 are rounded to bf16: the kernel computes in bf16);
        topk_ids: [M, k] int (-1 = none); topk_weights: [M, k] float; out: [M, H] float (written);
        shared_output: [M, H] or None (added). Returns out."""
        fi = compat.check_prepared(prepared, self.name)
        M = x.shape[0]
        if M == 0:  # trtllm-gen kernels must not see empty batches
            return out
        t, meta, spec = prepared.tensors, prepared.meta, prepared.spec
        Hp = meta["hidden_padded"]
        ids, w = compat.routable(topk_ids, topk_weights)
        routing = (ids, w) if meta["routing_tuple"] else pack_topk(ids, w)
        buf = output_buffer(out, Hp)
        E = spec.num_experts
        kw = {"topk_ids": routing, "hidden_states": compat.pad_cols(x.to(torch.bfloat16), Hp).contiguous(),
              "gemm1_weights": t["w13"], "gemm1_weights_scale": t["s13"], "gemm1_alpha": t.get("alpha"),
              "gemm1_beta": t.get("beta"), "gemm1_clamp_limit": t.get("limit"), "gemm2_weights": t["w2"],
              "gemm2_weights_scale": t["s2"], "num_experts": E, "top_k": spec.top_k, "n_group": None,
              "topk_group": None, "intermediate_size": meta["intermediate_padded"], "local_expert_offset": 0,
              "local_num_experts": E, "routed_scaling_factor": None, "output": buf}
        if prepared.format == "mxfp4":
            name = _PATHS["mxfp4"][1]
            kw.update({"routing_bias": None, "hidden_states_scale": None, "gemm1_bias": t.get("b13"),
                       "gemm2_bias": t.get("b2"), "output1_scale_scalar": t["scale_c1"],
                       "output1_scale_gate_scalar": t["scale_gate1"], "output2_scale_scalar": t["scale_c2"]})
        else:
            name = _PATHS["int4"][1]
        result = fi.call(_FM, name, kw, optional={"do_finalize": True})
        return finish_output(out, compat.first_tensor(result, name), shared_output)


def pack_topk(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ids [M, k] int32, weights [M, k] float -> [M, k] int32 (expert_id << 16) | bf16 bits of the
    weight: trtllm-gen's PackedScoreIdx {bf16 score; int16 idx} read as one little-endian int32.
    Inverse: `unpack_topk`."""
    bits = weights.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return (ids.to(torch.int32) << 16) | bits


def unpack_topk(packed: torch.Tensor):
    """Inverse of `pack_topk`: [M, k] int32 -> (ids int32, weights fp32 rounded to bf16)."""
    ids = packed >> 16
    low = packed & 0xFFFF
    bits = torch.where(low >= 0x8000, low - 0x10000, low).to(torch.int16)
    return ids, bits.view(torch.bfloat16).float()


BACKEND = FlashInferTrtllmBackend()
