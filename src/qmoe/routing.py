"""Routing: router logits -> (topk_ids, topk_weights), on the logits' device, no host sync.

`route` here is the reference semantics, in PyTorch (~7 small kernels on a GPU). What MoE
runs is qmoe.dispatch.route: the same answer from one fused Triton kernel
(qmoe.kernels.routing) where it can, else this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import MoESpec


def route(spec: MoESpec, router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None):
    """Choose top-k experts per token.

    router_logits: [M, E] float (any float dtype; computed in fp32)
    correction_bias: [E] float or None; used for selection only ("sigmoid_grouped",
        "sqrt_softplus"); ignored by "softmax"
    Returns topk_ids int32 [M, k], topk_weights float32 [M, k].
    """
    check_inputs(spec, router_logits, correction_bias)
    E, k = spec.num_experts, spec.top_k
    logits = router_logits.float()
    r = spec.routing
    if r.mode == "softmax":
        probs = torch.softmax(logits, dim=-1)
        w, ids = probs.topk(k, dim=-1)
        if r.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w * r.routed_scaling_factor
    else:
        if r.mode == "sigmoid_grouped":
            scores = torch.sigmoid(logits)
        else:  # sqrt_softplus
            scores = torch.sqrt(F.softplus(logits))
        biased = scores if correction_bias is None else scores + correction_bias.float()
        if r.n_group > 1:
            M = logits.shape[0]
            grouped = biased.view(M, r.n_group, E // r.n_group)
            group_score = grouped.topk(min(2, E // r.n_group), dim=-1).values.sum(dim=-1)
            keep = group_score.topk(r.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(M, E)
        ids = biased.topk(k, dim=-1).indices
        w = scores.gather(1, ids)
        if r.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w * r.routed_scaling_factor
    return ids.to(torch.int32), w.float()


def check_inputs(spec: MoESpec, router_logits, correction_bias=None) -> None:
    """ValueError naming the argument unless route(spec, router_logits, correction_bias) can run.

    Checks shapes, dtypes and devices only (no host sync); every routing path calls it.
    """
    E = spec.num_experts
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2 or router_logits.shape[1] != E:
        got = list(router_logits.shape) if isinstance(router_logits, torch.Tensor) else type(router_logits).__name__
        raise ValueError(f"router_logits: expected shape [M, {E}], got {got}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits: expected a float tensor, got {router_logits.dtype}")
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or tuple(correction_bias.shape) != (E,):
            got = (list(correction_bias.shape) if isinstance(correction_bias, torch.Tensor)
                   else type(correction_bias).__name__)
            raise ValueError(f"correction_bias: expected shape [{E}], got {got}")
        if not correction_bias.is_floating_point():
            raise ValueError(f"correction_bias: expected a float tensor, got {correction_bias.dtype}")
        if correction_bias.device != router_logits.device:
            raise ValueError(f"correction_bias: expected device {router_logits.device}, "
                             f"got {correction_bias.device}")
