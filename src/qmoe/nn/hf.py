"""Hugging Face MoE blocks as qmoe sees them: per family, the MoESpec, the router, and the expert
weights in the canonical layout, with the inverse (canonical -> the block's own parameters).

Read from the modules' attributes (transformers is never imported here); checked against
transformers 5.24. One block per family (the module that owns the router and the experts):

| family      | block class                          | experts (float params)                                   | router                                  |
| ----------- | ------------------------------------ | -------------------------------------------------------- | --------------------------------------- |
| gpt_oss     | GptOssMLP                            | experts.gate_up_proj [E, H, 2I] columns gate0, up0, ...; | router.weight [E, H], router.bias [E]:  |
|             |                                      | gate_up_proj_bias [E, 2I] (same order); down_proj        | top-k of the logits, softmax over the k |
|             |                                      | [E, I, H]; down_proj_bias [E, H]; SwiGLU alpha, limit    |                                         |
| gpt_oss     | Mxfp4GptOssMLP (MXFP4 kept)          | swizzled for triton_kernels: read from the checkpoint    | as above                                |
| qwen3_moe   | Qwen3MoeSparseMoeBlock               | experts.gate_up_proj [E, 2I, H] rows [gate; up];         | gate.weight [E, H]: softmax, top-k,     |
|             |                                      | down_proj [E, H, I]; act SiLU                            | renormalized if norm_topk_prob          |
| deepseek_v3 | DeepseekV3MoE (also Kimi-K2 / K2.5,  | experts.gate_up_proj [E, 2I, H] [gate; up]; down_proj    | gate.weight [E, H] in fp32, sigmoid,    |
|             | whose text model is DeepSeek-V3)     | [E, H, I]; act SiLU; shared_experts kept                 | e_score_correction_bias, n_group, ...   |
| deepseek_v4 | DeepseekV4SparseMoeBlock             | as deepseek_v3, act SiLU with swiglu limit; shared kept  | gate.weight: sqrt(softplus), bias; hash |
|             |                                      |                                                          | layers keep the model's own router      |

`describe(block)` -> HFMoE (ValueError naming the class for blocks qmoe does not know or cannot
express); `read_experts(block)` -> canonical float (w13, w2, b13, b2); `write_experts(block, ...)`
its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..spec import MoESpec, Routing, SwiGLU
from ..weights import deinterleave_gate_up, interleave_gate_up

BLOCKS = {
    "GptOssMLP": "gpt_oss",
    "Mxfp4GptOssMLP": "gpt_oss",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "DeepseekV3MoE": "deepseek_v3",
    "DeepseekV4SparseMoeBlock": "deepseek_v4",
}
"""Class name of a Hugging Face MoE block -> its family."""

_SILU = ("SiLU", "SiLUActivation")


@dataclass(eq=False)
class HFMoE:
    """What qmoe takes from one Hugging Face MoE block.

    family: "gpt_oss" | "qwen3_moe" | "deepseek_v3" | "deepseek_v4"
    spec: the MoESpec of its experts and routing
    router_weight: [E, H] (the model's tensor, not a copy); router_bias: [E] or None;
    correction_bias: [E] fp32 or None (selection only); router_dtype: the dtype the model computes
      its router logits in (None: the hidden states' dtype)
    shared_experts: the block's shared-experts module (kept running; its output is added) or None
    hash_gate: DeepSeek-V4 hash layers: the model's own router (token id -> experts), else None
    returns_router_scores: the block returns (hidden, router scores) (GPT-OSS) instead of hidden
    quantized: the experts hold no float weights (Mxfp4GptOssMLP): read them from the checkpoint
    """

    family: str
    spec: MoESpec
    router_weight: torch.Tensor
    router_bias: torch.Tensor | None = None
    correction_bias: torch.Tensor | None = None
    router_dtype: torch.dtype | None = None
    shared_experts: nn.Module | None = None
    hash_gate: nn.Module | None = None
    returns_router_scores: bool = False
    quantized: bool = False


def family_of(block) -> str | None:
    """The family of a Hugging Face MoE block (by class name), or None."""
    return BLOCKS.get(type(block).__name__)


def _need(obj, name: str, where: str):
    if not hasattr(obj, name):
        raise ValueError(f"block: {where} has no attribute {name!r} (a transformers version qmoe does not "
                         f"know? checked with transformers 5.24)")
    return getattr(obj, name)


def _silu(experts, cls: str):
    act = _need(experts, "act_fn", cls)
    if type(act).__name__ not in _SILU:
        raise ValueError(f"block: {cls} uses activation {type(act).__name__}; qmoe's experts are SwiGLU "
                         f"(SiLU-gated), so this block cannot be expressed")


def describe(block: nn.Module) -> HFMoE:
    """The spec and router of a Hugging Face MoE block (see the module docstring).

    ValueError naming the class for a block of another kind, and naming the setting for a
    configuration qmoe cannot express (another activation, a router qmoe does not have).
    """
    cls = type(block).__name__
    family = BLOCKS.get(cls)
    if family is None:
        raise ValueError(f"block: {cls} is not a Hugging Face MoE block qmoe knows (known: "
                         f"{', '.join(BLOCKS)})")
    if family == "gpt_oss":
        router, experts = _need(block, "router", cls), _need(block, "experts", cls)
        E, H = router.weight.shape
        I = int(_need(experts, "intermediate_size", cls))
        alpha = float(getattr(experts, "alpha", 1.702))
        limit = getattr(experts, "limit", 7.0)
        spec = MoESpec(E, int(router.top_k), H, I, SwiGLU(alpha=alpha, beta=1.0, limit=float(limit)),
                       Routing("softmax", renormalize=True), bias=True, name="gpt-oss (hf)")
        return HFMoE(family, spec, router.weight, router.bias, returns_router_scores=True,
                     quantized=cls == "Mxfp4GptOssMLP")
    gate, experts = _need(block, "gate", cls), _need(block, "experts", cls)
    if isinstance(experts, nn.ModuleList):
        raise ValueError(f"block: {cls} holds its experts as a ModuleList (transformers 4.x); qmoe reads "
                         f"the fused gate_up_proj / down_proj parameters of transformers 5")
    _silu(experts, f"{cls}.experts")
    E, two_i, H = _need(experts, "gate_up_proj", f"{cls}.experts").shape
    I, k = two_i // 2, int(_need(gate, "top_k", f"{cls}.gate"))
    if family == "qwen3_moe":
        spec = MoESpec(E, k, H, I, SwiGLU(), Routing("softmax", renormalize=bool(gate.norm_topk_prob)),
                       name="qwen3-moe (hf)")
        return HFMoE(family, spec, gate.weight)
    if family == "deepseek_v3":
        routing = Routing("sigmoid_grouped", renormalize=bool(gate.norm_topk_prob), n_group=int(gate.num_group),
                          topk_group=int(gate.topk_group),
                          routed_scaling_factor=float(gate.routed_scaling_factor))
        spec = MoESpec(E, k, H, I, SwiGLU(), routing, name="deepseek-v3 (hf)")
        return HFMoE(family, spec, gate.weight, correction_bias=gate.e_score_correction_bias,
                     router_dtype=torch.float32, shared_experts=getattr(block, "shared_experts", None))
    # deepseek_v4
    limit = getattr(experts, "limit", None)
    act = SwiGLU(limit=None if limit is None else float(limit))
    score = type(_need(gate, "score_fn", f"{cls}.gate")).__name__
    modes = {"SqrtSoftplusActivation": "sqrt_softplus", "Sigmoid": "sigmoid_grouped"}
    if score not in modes:
        raise ValueError(f"block: {cls} scores its router with {score}; qmoe routes with sqrt(softplus) or "
                         f"sigmoid for this family")
    routing = Routing(modes[score], renormalize=True, routed_scaling_factor=float(gate.routed_scaling_factor))
    spec = MoESpec(E, k, H, I, act, routing, name="deepseek-v4 (hf)")
    hashed = bool(getattr(block, "is_hash", False))
    return HFMoE(family, spec, gate.weight, correction_bias=None if hashed else gate.e_score_correction_bias,
                 shared_experts=getattr(block, "shared_experts", None), hash_gate=gate if hashed else None)


def read_experts(block: nn.Module):
    """The block's float expert weights in the canonical layout (detached views or copies of
    its parameters, on their device and dtype).

    Returns w13 [E, 2I, H] (rows gate then up), w2 [E, H, I], b13 [E, 2I] or None, b2 [E, H] or None.
    Inverse: `write_experts`.
    """
    info = describe(block)
    experts = block.experts
    if info.quantized:
        raise ValueError(f"block: {type(block).__name__} holds MXFP4 experts swizzled for triton_kernels, not "
                         f"float weights; read their bytes from the checkpoint (checkpoint=<path>)")
    if info.family == "gpt_oss":
        w13 = deinterleave_gate_up(experts.gate_up_proj.detach().transpose(1, 2))
        b13 = deinterleave_gate_up(experts.gate_up_proj_bias.detach())
        return w13, experts.down_proj.detach().transpose(1, 2), b13, experts.down_proj_bias.detach()
    return experts.gate_up_proj.detach(), experts.down_proj.detach(), None, None


def write_experts(block: nn.Module, w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None = None,
                  b2: torch.Tensor | None = None) -> None:
    """Copy canonical float weights into the block's parameters, in its own layout and dtype
    (inverse of `read_experts`; for tests that compare a model against its quantized self).

    w13: [E, 2I, H]; w2: [E, H, I]; b13: [E, 2I] / b2: [E, H] (GPT-OSS only; None keeps them).
    """
    info = describe(block)
    experts = block.experts
    if info.quantized:
        raise ValueError(f"block: {type(block).__name__} holds no float expert weights to write")
    with torch.no_grad():
        if info.family == "gpt_oss":
            experts.gate_up_proj.copy_(interleave_gate_up(w13).transpose(1, 2))
            experts.down_proj.copy_(w2.transpose(1, 2))
            if b13 is not None:
                experts.gate_up_proj_bias.copy_(interleave_gate_up(b13))
            if b2 is not None:
                experts.down_proj_bias.copy_(b2)
            return
        if b13 is not None or b2 is not None:
            raise ValueError(f"b13: {type(block).__name__} has no expert biases, got one")
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)


__all__ = ["BLOCKS", "HFMoE", "describe", "family_of", "read_experts", "write_experts"]
