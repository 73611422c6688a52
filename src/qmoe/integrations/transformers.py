"""Hugging Face transformers models with qmoe experts: replace the MoE blocks in place, and undo it.

    from qmoe.integrations.transformers import patch, unpatch
    replaced = patch(model, format="mxfp4", backend="auto")   # {module name: the original block}
    logits = model(input_ids).logits                          # the experts now run on qmoe
    unpatch(model, replaced)                                  # the original blocks are back

Each known MoE block (qmoe.nn.hf.BLOCKS: GPT-OSS, Qwen3-MoE, DeepSeek-V3 and Kimi-K2 / K2.5,
DeepSeek-V4) becomes a `QmoeBlock` holding a qmoe.nn.MoELayer built from the block's own router
and expert weights (quantized to `format`, or read from `checkpoint`); the block's shared experts
keep running as the model's own module, their output added by qmoe. Nothing else in the model
changes. A model holding MoE-like modules qmoe does not know (a child named `experts`, or a class
named *Experts outside the known blocks) is refused with a ValueError naming their classes, before
anything is replaced. transformers itself is not imported: the modules are read by class and
attribute names (checked against transformers 5.24).

Differences from the unpatched model, by design: router weights are computed in fp32 (transformers
rounds GPT-OSS's and Qwen3-MoE's to the model dtype); GPT-OSS blocks return (hidden, None), and
router logits are not recorded for `output_router_logits` (inference only: no auxiliary loss, no
gradient through the experts).
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import format_info
from ..nn import MoELayer, hf
from ..nn.layer import load_experts
from ..weights import ExpertWeights


class QmoeBlock(nn.Module):
    """A Hugging Face MoE block run by qmoe.

    moe: the MoELayer (router, experts, and the model's shared experts module);
    hash_gate: DeepSeek-V4 hash layers: the model's own router, called with input_ids (its
      choice runs through the experts op), else None;
    returns_router_scores: return (hidden, None) as GPT-OSS's MLP returns (hidden, scores).
    forward(hidden_states [..., H], input_ids=None) -> [..., H] in hidden_states' dtype.
    """

    def __init__(self, moe: MoELayer, hash_gate: nn.Module | None = None, returns_router_scores: bool = False,
                 family: str = ""):
        super().__init__()
        self.moe = moe
        self.hash_gate = hash_gate
        self.returns_router_scores = returns_router_scores
        self.family = family

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None, **kwargs):
        if self.hash_gate is not None:
            if input_ids is None:
                raise ValueError("input_ids: this DeepSeek-V4 hash layer routes by token id; got None "
                                 "(pass input_ids, not inputs_embeds)")
            _, topk_weights, topk_ids = self.hash_gate(hidden_states, input_ids)
            out = self.moe.experts(hidden_states, topk_ids, topk_weights)
        else:
            out = self.moe(hidden_states)
        return (out, None) if self.returns_router_scores else out

    def extra_repr(self) -> str:
        return self.family + (", hash routing by the model's router" if self.hash_gate is not None else "")


def find_blocks(model: nn.Module):
    """([(name, block)] of the known MoE blocks, {class name: first module name} of MoE-like
    modules qmoe does not know), in module order."""
    known, unknown = [], {}
    inside = []
    for name, module in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in inside):
            continue
        if hf.family_of(module) is not None:
            known.append((name, module))
            inside.append(name)
        elif isinstance(module, (QmoeBlock, MoELayer)):
            inside.append(name)
        elif "experts" in module._modules or type(module).__name__.endswith("Experts"):
            unknown.setdefault(type(module).__name__, name)
            inside.append(name)
    return known, unknown


def _layer(name: str, block: nn.Module, format: str, backend: str, checkpoint, kwargs) -> QmoeBlock:
    info = hf.describe(block)
    if info.hash_gate is None:
        layer = MoELayer.from_hf(block, format, backend, checkpoint=checkpoint, prefix=name, **kwargs)
    else:
        if checkpoint is None:
            w13, w2, b13, b2 = hf.read_experts(block)
            weights = ExpertWeights.from_float(w13, w2, format, b13, b2)
        else:
            weights = load_experts(checkpoint, info, format, name).to(info.router_weight.device)
        layer = MoELayer(info.spec, weights, info.router_weight, backend=backend, router_dtype=info.router_dtype,
                         shared_experts=info.shared_experts, **kwargs)
    return QmoeBlock(layer, info.hash_gate, info.returns_router_scores, info.family)


def patch(model: nn.Module, format: str = "mxfp4", backend: str = "auto", *, checkpoint=None,
          **layer_kwargs) -> dict:
    """Replace the model's MoE blocks by qmoe blocks built from its own weights.

    model: a transformers model (any nn.Module holding known MoE blocks), on the device it runs on;
    format: "mxfp4" | "nvfp4" | "int4" | "bf16": the float expert weights are quantized to it;
    backend: "auto" or a backend name (qmoe.backends.BACKEND_NAMES);
    checkpoint: None, or a safetensors file / folder whose quantized expert bytes are read instead
      of quantizing (by format: "mxfp4" a GPT-OSS checkpoint, "int4" compressed-tensors
      pack-quantized, "nvfp4" ModelOpt NVFP4), the block's module name being its name there;
    layer_kwargs: passed to MoELayer (max_layout_bytes).
    Returns {module name: the original block} for `unpatch` (holding it keeps the float experts
    alive; drop it to free them). ValueError, with nothing replaced, for unknown MoE-like modules,
    a model without known MoE blocks, or a block qmoe cannot express (naming it).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    format_info(format)
    known, unknown = find_blocks(model)
    if unknown:
        listed = ", ".join(f"{cls} (at {where})" for cls, where in unknown.items())
        raise ValueError(f"model: MoE modules qmoe does not know: {listed}; qmoe patches "
                         f"{', '.join(sorted(set(hf.BLOCKS)))}")
    if not known:
        already = any(isinstance(m, QmoeBlock) for m in model.modules())
        raise ValueError("model: already patched by qmoe (unpatch it first)" if already else
                         f"model: no MoE block qmoe knows in {type(model).__name__} (known: "
                         f"{', '.join(hf.BLOCKS)})")
    if known[0][0] == "":
        raise ValueError(f"model: {type(model).__name__} is itself a MoE block; patch the model holding it, or "
                         f"make its layer with qmoe.nn.MoELayer.from_hf")
    made = {}
    for name, block in known:  # build every layer before replacing any: a refusal changes nothing
        try:
            made[name] = _layer(name, block, format, backend, checkpoint, layer_kwargs)
        except ValueError as e:
            raise ValueError(f"{name} ({type(block).__name__}): {e}") from None
    replaced = {}
    for name, block in known:
        model.set_submodule(name, made[name])
        replaced[name] = block
    return replaced


def unpatch(model: nn.Module, replaced: dict) -> None:
    """Put back the blocks `patch` replaced (its return value). ValueError, with nothing changed,
    when a named module is not the qmoe block patch put there."""
    if not isinstance(replaced, dict):
        raise ValueError(f"replaced: expected the dict patch returned, got {type(replaced).__name__}")
    for name in replaced:
        try:
            now = model.get_submodule(name)
        except AttributeError:
            now = None
        if not isinstance(now, QmoeBlock):
            got = type(now).__name__ if now is not None else "missing"
            raise ValueError(f"replaced: {name} is {got} in the model, not a qmoe block (not patched by this "
                             f"call of patch, or unpatched already)")
    for name, block in replaced.items():
        model.set_submodule(name, block)


__all__ = ["QmoeBlock", "find_blocks", "patch", "unpatch"]
