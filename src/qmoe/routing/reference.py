"""The reference routing, in PyTorch: the semantics every routing path must reproduce.

    ids, weights = route(spec, router_logits, correction_bias)

~7 small kernels on a GPU; `qmoe.route` runs the fused Triton kernel (qmoe.kernels.routing)
where it can and this elsewhere (the CPU, TRITON_INTERPRET, modes the kernel does not cover).

Ties: experts with equal selection keys are taken lower id first (a stable descending sort),
in the groups' choice too; the fused kernel does the same, so both pick the same experts on
any input. Renormalized weights divide by sum + RENORM_EPS for the sigmoid and sqrt-softplus
modes (as Hugging Face's DeepSeek-V3 does), so selected scores that underflow to 0 give
weights of 0, not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import MoESpec

RENORM_EPS = 1e-20
"""Added to the sum of the selected scores before renormalizing ("sigmoid_grouped",
"sqrt_softplus"); softmax probabilities cannot all underflow, so softmax divides by the sum."""


def _top(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest keys per row, largest first, ties to the lower index (NaN
    ranks above every number, as in torch.sort)."""
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]


def route(spec: MoESpec, router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None):
    """Choose top-k experts per token (inputs are validated by qmoe.routing.check_inputs first).

    router_logits: [M, E] float (any float dtype; computed in fp32)
    correction_bias: [E] float or None; used for selection only ("sigmoid_grouped",
        "sqrt_softplus"); ignored by "softmax"
    Returns topk_ids int32 [M, k], topk_weights float32 [M, k], best first.
    """
    E, k = spec.num_experts, spec.top_k
    logits = router_logits.float()
    r = spec.routing
    if r.mode == "softmax":
        probs = torch.softmax(logits, dim=-1)
        ids = _top(probs, k)
        w = probs.gather(1, ids)
        if r.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids.to(torch.int32), (w * r.routed_scaling_factor).float()
    if r.mode == "sigmoid_grouped":
        scores = torch.sigmoid(logits)
    else:  # sqrt_softplus
        scores = torch.sqrt(F.softplus(logits))
    biased = scores if correction_bias is None else scores + correction_bias.float()
    if r.n_group > 1:
        M = logits.shape[0]
        per_group = E // r.n_group
        grouped = biased.view(M, r.n_group, per_group)
        top2 = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., :min(2, per_group)]
        keep = _top(top2.sum(dim=-1), r.topk_group)
        mask = torch.zeros(M, r.n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        biased = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(M, E)
    ids = _top(biased, k)
    w = scores.gather(1, ids)
    if r.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return ids.to(torch.int32), (w * r.routed_scaling_factor).float()


__all__ = ["RENORM_EPS", "route"]
