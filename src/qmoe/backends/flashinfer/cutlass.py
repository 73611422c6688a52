"""The `flashinfer_cutlass` backend: FlashInfer's CUTLASS fused MoE, SM90 MXFP4 W4A16 path.

`flashinfer.fused_moe.cutlass_fused_moe(..., use_w4_group_scaling=True)` on Hopper: bf16
activations, MXFP4 weights (E2M1 codes, E8M0 scales per 32) in FlashInfer's SM90
mixed-GEMM interleave. Layout made by `prepare` (all tensors on the weights' device):

  w13: [E, 2Ip, Hp/2] uint8, rows [up; gate] (each half padded to Ip), then
       interleave_moe_weights_for_sm90_mixed_gemm(w, "fp4")
  s13: interleave_moe_scales_for_sm90_mixed_gemm([E, 2Ip, Hp/32] uint8 E8M0)
  w2:  [E, Hp, Ip/2] uint8, interleaved the same way;  s2 likewise from [E, Hp, Ip/32]
  b13: [E, 2Ip] bf16 [up; gate], b2: [E, Hp] bf16 (both or none: the kernel takes both)
  swiglu_alpha / beta / limit: [E] fp32 (None for plain SiLU-GLU)
with Hp, Ip = hidden and intermediate size rounded up to 128 (the interleave's tile);
padding holds zero codes, so padded rows and columns contribute exactly 0, and the output
is trimmed back to H columns.

The interleaved bytes differ between FlashInfer versions (0.6.16, 0.6.16.post3 and 0.6.18
changed them), so a layout is refused under any version but the one that made it.
FlashInfer's SM100 CUTLASS paths (NVFP4 / MXFP4 with FP4 or FP8 activations) need
activation quantization and swizzled scale layouts that qmoe does not prepare; on SM100
use flashinfer_trtllm or flashinfer_cutedsl.
"""

from __future__ import annotations

import torch

from ...spec import MoESpec
from ...weights import ExpertWeights
from . import compat
from ..base import Prepared, Support, finish_output, output_buffer

PATH = "cutlass_sm90_w4a16"
_FM = "flashinfer.fused_moe"
_KERNEL_PARAMS = ("input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
                  "fc2_expert_weights", "output_dtype", "quant_scales", "fc1_expert_biases",
                  "fc2_expert_biases", "swiglu_alpha", "swiglu_beta", "swiglu_limit", "output",
                  "use_w4_group_scaling")
TILE = 128
_E8M0_ONE = 127  # scale byte of padded blocks: any finite scale works, their codes are 0


class FlashInferCutlassBackend(compat.FlashInferBackend):
    name = "flashinfer_cutlass"
    formats = ("mxfp4",)
    capturable = True
    first_use = ("the SM90 MoE module is JIT-built with nvcc on first use (~15 min) unless a prebuilt one is "
                 "installed (docs/flashinfer.md)")

    def format_hint(self, fmt):
        return {"nvfp4": " (it is the SM90 MXFP4 W4A16 path; NVFP4 W4A16 runs on flashinfer_cutedsl, SM100)",
                "int4": " (it is the SM90 MXFP4 W4A16 path; int4 W4A16 runs on flashinfer_trtllm, SM100)"
                }.get(fmt, " (it is the SM90 MXFP4 W4A16 path)")

    def _supports(self, spec, fmt, device) -> Support:
        cap = compat.device_capability(device)
        if cap is None:
            return Support(False, f"needs a CUDA GPU (SM90); device {device} is not one or no GPU is visible")
        if cap != (9, 0):
            sm = f"SM{cap[0]}{cap[1]}"
            extra = ("; on SM100 use flashinfer_trtllm (MXFP4 W4A16) or flashinfer_cutedsl (NVFP4)"
                     if cap[0] >= 10 else "")
            return Support(False, f"the W4A16 CUTLASS path needs SM90 (Hopper); this GPU is {sm}{extra}")
        fi, why = compat.load()
        if fi is None:
            return Support(False, why)
        for where, name, params in ((_FM, "cutlass_fused_moe", _KERNEL_PARAMS),
                                    (_FM, "interleave_moe_weights_for_sm90_mixed_gemm", ("weight", "quant_type")),
                                    (_FM, "interleave_moe_scales_for_sm90_mixed_gemm", ("scales", "group_size"))):
            missing = fi.missing(where, name, params)
            if missing:
                return Support(False, f"{missing} (the SM90 W4A16 path needs flashinfer >= 0.6.10; "
                                      f"qmoe recommends >= 0.6.18)")
        return self._gated(PATH, fi, f"flashinfer {fi.version} SM90 CUTLASS W4A16 (MXFP4 weights, bf16 activations)")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        fi, _ = compat.load()
        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        Hp, Ip = compat.padded(H, TILE), compat.padded(I, TILE)
        k = spec.top_k  # k all-zero spare experts after the real ones: where ids of -1 go (forward)

        def spare(t, fill=0):
            return torch.cat((t, torch.full((k, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)))

        def interleave(q, rows, cols, gated):
            data, scales = spare(q.data), spare(q.scales.view(torch.uint8)).view(q.scales.dtype)
            if gated:
                data, scales = compat.up_gate(data, rows // 2), compat.up_gate(scales, rows // 2, _E8M0_ONE)
            data = compat.pad_last2(data, rows, cols // 2)
            scales = compat.pad_last2(scales, rows, cols // 32, _E8M0_ONE)
            w = fi.call(_FM, "interleave_moe_weights_for_sm90_mixed_gemm",
                        {"weight": data.contiguous(), "quant_type": "fp4"})
            s = fi.call(_FM, "interleave_moe_scales_for_sm90_mixed_gemm",
                        {"scales": scales.contiguous(), "group_size": 32})
            return w, s

        w13, s13 = interleave(weights.w13, 2 * Ip, Hp, gated=True)
        w2, s2 = interleave(weights.w2, Hp, Ip, gated=False)
        t = {"w13": w13, "s13": s13, "w2": w2, "s2": s2}
        if weights.has_bias:
            dev = weights.device
            b13 = weights.b13 if weights.b13 is not None else torch.zeros(E, 2 * I, device=dev)
            b2 = weights.b2 if weights.b2 is not None else torch.zeros(E, H, device=dev)
            t["b13"] = spare(compat.up_gate(b13, Ip).to(torch.bfloat16))
            t["b2"] = spare(compat.pad_last2(b2.unsqueeze(1), 1, Hp)[:, 0].to(torch.bfloat16))
        act = spec.activation
        if (act.alpha, act.beta, act.limit) != (1.0, 0.0, None):
            lim = torch.finfo(torch.float32).max if act.limit is None else act.limit
            for name, v in (("alpha", act.alpha), ("beta", act.beta), ("limit", lim)):
                t[name] = torch.full((E + k,), float(v), dtype=torch.float32, device=weights.device)
        compat.quiet_logging()  # the interleave helpers may have loaded (and built) FlashInfer modules
        meta = {**compat.stamp(fi), "hidden_size": H, "hidden_padded": Hp, "intermediate_padded": Ip,
                "num_experts": E,
                # quant_scales are int32 views of the E8M0 bytes, as the kernel takes them
                "quant_scales": [s13.view(torch.int32), s2.view(torch.int32)]}
        return Prepared(self.name, spec, weights.format, weights.device, t, meta)

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        """x: [M, H] bf16 (fp16 / fp32 are rounded to bf16: the kernel computes in bf16);
        topk_ids: [M, k] int (-1 = none); topk_weights: [M, k] float; out: [M, H] float (written);
        shared_output: [M, H] or None (added). Returns out."""
        fi = compat.check_prepared(prepared, self.name)
        M = x.shape[0]
        if M == 0:  # some FlashInfer kernels crash on empty batches
            return out
        t, meta = prepared.tensors, prepared.meta
        Hp = meta["hidden_padded"]
        ids, w = compat.routable_spare(topk_ids, topk_weights, meta["num_experts"])
        buf = output_buffer(out, Hp)
        result = fi.call(_FM, "cutlass_fused_moe", {
            "input": compat.pad_cols(x.to(torch.bfloat16), Hp).contiguous(), "token_selected_experts": ids,
            "token_final_scales": w, "fc1_expert_weights": t["w13"], "fc2_expert_weights": t["w2"],
            "output_dtype": torch.bfloat16, "quant_scales": meta["quant_scales"],
            "fc1_expert_biases": t.get("b13"), "fc2_expert_biases": t.get("b2"),
            "swiglu_alpha": t.get("alpha"), "swiglu_beta": t.get("beta"), "swiglu_limit": t.get("limit"),
            "output": buf, "use_w4_group_scaling": True})
        return finish_output(out, compat.first_tensor(result, "cutlass_fused_moe"), shared_output)


BACKEND = FlashInferCutlassBackend()
