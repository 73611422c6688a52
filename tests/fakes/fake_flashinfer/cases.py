"""Inputs and error measure shared by the FlashInfer backend tests."""

import torch

from qmoe.backends.reference import reference_moe


def moe_inputs(spec, M, seed=0):
    """x [M, H] bf16, topk_ids [M, k] int32 (distinct experts), topk_weights [M, k] fp32 (softmax)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, spec.hidden_size, generator=g).to(torch.bfloat16)
    ids = torch.rand(M, spec.num_experts, generator=g).topk(spec.top_k, dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(M, spec.top_k, generator=g), dim=1)
    return x, ids, w


def rel_err(out, spec, weights, x, ids, w, shared=None):
    """||out - ref|| / ||ref|| against the float64 reference on the dequantized weights."""
    ref = reference_moe(spec, weights, x, ids, w, shared_output=shared, dtype=torch.float64)
    return ((out.double() - ref).norm() / ref.norm()).item()


def run(backend, spec, weights, M=6, seed=0, prepared=None):
    """Prepare (unless given), run forward into a NaN-poisoned out; returns (out, rel. error, prepared)."""
    prepared = prepared or backend.prepare(spec, weights)
    x, ids, w = moe_inputs(spec, M, seed)
    out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16)
    res = backend.forward(prepared, x, ids, w, out)
    assert res is out
    return out, rel_err(out, spec, weights, x, ids, w), prepared
