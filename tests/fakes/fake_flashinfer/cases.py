"""Inputs and error measure shared by the FlashInfer backend tests."""

import torch

from conftest import moe_inputs, rel_err  # noqa: F401  (the tests import both from here)


def run(backend, spec, weights, M=6, seed=0, prepared=None):
    """Prepare (unless given), run forward into a NaN-poisoned out; returns (out, rel. error, prepared)."""
    prepared = prepared or backend.prepare(spec, weights)
    x, ids, w = moe_inputs(spec, M, seed)
    out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16)
    res = backend.forward(prepared, x, ids, w, out)
    assert res is out
    return out, rel_err(out, spec, weights, x, ids, w), prepared
