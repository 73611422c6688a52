"""The reference backend: plain PyTorch on any device, the ground truth.

For each active expert it dequantizes only that expert (never all E at once:
gpt-oss-120b is 1.7 GB of packed weights per layer) and computes in fp32
(or float64 through `reference_moe`). It synchronizes with the host to find
the active experts, so it is not CUDA-graph capturable; it is meant to be right,
not fast.
"""

from __future__ import annotations

import torch

from ..formats import FORMATS, dequantize
from ..spec import MoESpec, SwiGLU
from ..weights import ExpertWeights
from .base import Backend, Prepared, Support


def swiglu(act: SwiGLU, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., I] float -> (u + beta) * g * sigmoid(alpha * g), same dtype, where
    g = min(gate, limit) and u = clamp(up, -limit, limit) (torch.clamp keeps NaN: so must every
    backend). The one torch home of the SwiGLU formula."""
    if act.limit is not None:
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    return (up + act.beta) * gate * torch.sigmoid(act.alpha * gate)


def reference_moe(spec: MoESpec, weights: ExpertWeights, x: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, shared_output: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The MoE experts computed in `dtype` on the dequantized weights.

    x: [M, H] float; topk_ids: [M, k] int (-1 = no expert; a token naming any id outside
    [-1, E) gets a NaN row, as the kernels do); topk_weights: [M, k] float;
    shared_output: [M, H] or None (added to the result).
    Returns [M, H] in `dtype` (float64 by default: the yardstick for relative errors).
    """
    M, H = x.shape
    I = weights.intermediate_size
    acc = torch.zeros(M, H, dtype=dtype, device=x.device)
    if M:
        ids = topk_ids.long()
        E = weights.num_experts
        bad = ((ids < -1) | (ids >= E)).any(dim=1)
        ids = torch.where((ids >= 0) & (ids < E), ids, -1)
        xd = x.to(dtype)
        for e in torch.unique(ids[ids >= 0]).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            w13 = dequantize(weights.w13[e]).to(dtype)
            h = xd[tok] @ w13.T
            del w13
            if weights.b13 is not None:
                h = h + weights.b13[e].to(dtype)
            a = swiglu(spec.activation, h[:, :I], h[:, I:])
            w2 = dequantize(weights.w2[e]).to(dtype)
            y = a @ w2.T
            del w2
            if weights.b2 is not None:
                y = y + weights.b2[e].to(dtype)
            acc.index_add_(0, tok, y * topk_weights[tok, slot].to(dtype).unsqueeze(1))
        acc[bad] = float("nan")
    if shared_output is not None:
        acc += shared_output.to(dtype)
    return acc


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (||out - ref|| when ref is all zeros; NaN when out holds
    NaN): the measure of every correctness figure qmoe reports."""
    diff = (out.double() - ref.double()).norm().item()
    norm = ref.double().norm().item()
    return diff / norm if norm > 0 else diff


class ReferenceBackend(Backend):
    name = "reference"
    formats = FORMATS
    capturable = False  # finds the active experts on the host: no CUDA-graph capture

    def _supports(self, spec, fmt, device) -> Support:
        return Support(True, "PyTorch on any device (slow: loops over the active experts)")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        # the canonical weights are this backend's layout: nothing is copied
        return Prepared(self.name, spec, weights.format, weights.device, meta={"weights": weights})

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        self.check_prepared(prepared)
        if x.shape[0] == 0:
            return out
        res = reference_moe(prepared.spec, prepared.meta["weights"], x, topk_ids, topk_weights,
                            shared_output, dtype=torch.float32)
        out.copy_(res)
        return out


BACKEND = ReferenceBackend()
