"""The `flashinfer_cutedsl` backend: FlashInfer's CuTe-DSL NVFP4 fused MoE on SM100 / SM103,
in its W4A16 mode (`cute_dsl_fused_moe_nvfp4(..., quant_mode="w4a16")`, flashinfer >= 0.6.18):
NVFP4 weights, bf16 activations. Needs nvidia-cutlass-dsl.

Layout made by `prepare`, following FlashInfer's own `prepare_cute_dsl_nvfp4_weights`
(fused_moe/prepare.py), which quantizes bf16 weights itself; qmoe applies the same steps
to its already-quantized codes:

  w13: [E, 2Ip, Hp/2] uint8, rows [up; gate] (each half padded to Ip) and then the linear
       and gate halves interleaved in groups of 64 rows (`_interleave_linear_and_gate`)
  s13: E4M3 scales of those rows, swizzled by `block_scale_interleave` and converted by
       `cute_dsl.utils.convert_sf_to_mma_layout(m=2Ip, k=Hp, num_groups=E, sf_vec_size=16)`
  w2, s2: the same without the row interleave, m=Hp, k=Ip
  w1_alpha, w2_alpha: [E] fp32, the NVFP4 global scales of w13 and w2
with Hp, Ip = hidden and intermediate size rounded up to 128. No biases.

qmoe has not run this path on an SM100 GPU yet: it is gated (see flashinfer.compat.gate)
and runs only with QMOE_FLASHINFER_FORCE=1.
"""

from __future__ import annotations

import torch

from ...spec import MoESpec
from ...weights import ExpertWeights
from . import compat
from ..base import Prepared, Support, finish_output, output_buffer

PATH = "cutedsl_nvfp4_w4a16"
_FM = "flashinfer.fused_moe"
_PREPARE = "flashinfer.fused_moe.prepare"
_UTILS = "flashinfer.cute_dsl.utils"
_KERNEL = "cute_dsl_fused_moe_nvfp4"
_KERNEL_PARAMS = ("x", "x_sf", "token_selected_experts", "token_final_scales", "w1_weight", "w1_weight_sf",
                  "w1_alpha", "fc2_input_scale", "w2_weight", "w2_weight_sf", "w2_alpha", "num_experts",
                  "top_k", "moe_output", "swiglu_alpha", "swiglu_beta", "swiglu_limit", "quant_mode")
TILE = 128
ROW_GROUP = 64  # rows per linear/gate group in FlashInfer's gemm1 interleave
_E4M3_ONE = 0x38  # byte of 1.0 in float8_e4m3fn: scale of padded blocks (their codes are 0)


class FlashInferCuteDslBackend(compat.FlashInferBackend):
    name = "flashinfer_cutedsl"

    formats = ("nvfp4",)
    experimental = True

    def format_hint(self, fmt):
        return " (mxfp4: flashinfer_cutlass on SM90, flashinfer_trtllm on SM100)" if fmt == "mxfp4" else ""

    def _supports(self, spec, fmt, device) -> Support:
        cap = compat.device_capability(device)
        if cap is None:
            return Support(False, f"needs a CUDA GPU (SM100 / SM103); device {device} is not one or no GPU "
                                  f"is visible")
        if cap[0] != 10:
            return Support(False, f"the CuTe-DSL NVFP4 MoE needs SM100 or SM103; this GPU is SM{cap[0]}{cap[1]}")
        fi, why = compat.load()
        if fi is None:
            return Support(False, why)
        if not compat.has_module("cutlass"):
            return Support(False, "nvidia-cutlass-dsl is not installed (the CuTe-DSL kernels need it)")
        missing = fi.missing(_FM, _KERNEL, _KERNEL_PARAMS)
        if missing:
            return Support(False, f"{missing} (bf16-activation mode quant_mode='w4a16' needs flashinfer >= 0.6.18)")
        for where, name, ps in ((_PREPARE, "_interleave_linear_and_gate", ("x", "group_size", "dim")),
                                (_UTILS, "convert_sf_to_mma_layout", ("sf", "m", "k", "num_groups", "sf_vec_size"))):
            missing = fi.missing(where, name, ps)
            if missing:
                return Support(False, missing)
        if compat.block_scale_interleave_place(fi) is None:
            return Support(False, f"flashinfer {fi.version} has no block_scale_interleave")
        if spec.bias:
            return Support(False, "cute_dsl_fused_moe_nvfp4 takes no biases; this layer has them")
        return self._gated(PATH, fi, f"flashinfer {fi.version} CuTe-DSL NVFP4 W4A16 (bf16 activations)")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        if weights.has_bias:
            raise ValueError("weights: cute_dsl_fused_moe_nvfp4 takes no biases; these weights have them")
        fi, _ = compat.load()
        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        Hp, Ip = compat.padded(H, TILE), compat.padded(I, TILE)
        bsi_where = compat.block_scale_interleave_place(fi)

        def interleave_rows(t):
            return fi.call(_PREPARE, "_interleave_linear_and_gate", {"x": t, "group_size": ROW_GROUP, "dim": 1})

        def mma_scales(s_bytes, m, k):
            sw = fi.call(bsi_where, "block_scale_interleave", {"unswizzled_sf": s_bytes.contiguous()})
            return fi.call(_UTILS, "convert_sf_to_mma_layout",
                           {"sf": sw, "m": m, "k": k, "num_groups": E, "sf_vec_size": 16})

        q13, q2 = weights.w13, weights.w2
        # scales move as raw bytes: padding and row permutations are byte copies
        d13 = compat.pad_last2(compat.up_gate(q13.data, Ip), 2 * Ip, Hp // 2)
        s13 = compat.pad_last2(compat.up_gate(q13.scales.view(torch.uint8), Ip, _E4M3_ONE),
                               2 * Ip, Hp // 16, _E4M3_ONE)
        d2 = compat.pad_last2(q2.data, Hp, Ip // 2)
        s2 = compat.pad_last2(q2.scales.view(torch.uint8), Hp, Ip // 16, _E4M3_ONE)
        t = {"w13": interleave_rows(d13).contiguous(),
             "s13": mma_scales(interleave_rows(s13), 2 * Ip, Hp),
             "w2": d2, "s2": mma_scales(s2, Hp, Ip),
             "alpha13": q13.global_scale.float().reshape(E).contiguous(),
             "alpha2": q2.global_scale.float().reshape(E).contiguous()}
        compat.quiet_logging()
        act = spec.activation
        meta = {**compat.stamp(fi), "hidden_size": H, "hidden_padded": Hp,
                "swiglu": (float(act.alpha), float(act.beta),
                           float(torch.finfo(torch.float32).max if act.limit is None else act.limit))}
        return Prepared(self.name, spec, weights.format, weights.device, t, meta)

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        """x: [M, H] bf16 (fp16 / fp32 are rounded to bf16: the kernel computes in bf16);
        topk_ids: [M, k] int (-1 = none); topk_weights: [M, k] float; out: [M, H] float (written);
        shared_output: [M, H] or None (added). Returns out."""
        fi = compat.check_prepared(prepared, self.name)
        M = x.shape[0]
        if M == 0:
            return out
        t, meta, spec = prepared.tensors, prepared.meta, prepared.spec
        Hp = meta["hidden_padded"]
        ids, w = compat.routable(topk_ids, topk_weights)
        buf = output_buffer(out, Hp)
        alpha, beta, limit = meta["swiglu"]
        result = fi.call(_FM, _KERNEL, {
            "x": compat.pad_cols(x.to(torch.bfloat16), Hp).contiguous(), "x_sf": None, "token_selected_experts": ids,
            "token_final_scales": w, "w1_weight": t["w13"], "w1_weight_sf": t["s13"], "w1_alpha": t["alpha13"],
            "fc2_input_scale": None, "w2_weight": t["w2"], "w2_weight_sf": t["s2"], "w2_alpha": t["alpha2"],
            "num_experts": spec.num_experts, "top_k": spec.top_k, "moe_output": buf,
            "swiglu_alpha": alpha, "swiglu_beta": beta, "swiglu_limit": limit, "quant_mode": "w4a16"},
            optional={"output_dtype": torch.bfloat16})
        return finish_output(out, compat.first_tensor(result, _KERNEL), shared_output)


BACKEND = FlashInferCuteDslBackend()
