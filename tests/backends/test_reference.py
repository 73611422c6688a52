"""The reference backend against an independent dense float64 computation written here."""

import dataclasses
import math

import pytest
import torch
from conftest import random_weights, small_spec

import qmoe
from qmoe.backends import reference
from qmoe.backends.reference import reference_moe, swiglu


def dense_moe(spec, weights, x, topk_ids, topk_weights, shared_output=None):
    """Token by token, slot by slot, on all experts dequantized up front, in float64.

    Returns (out [M, H] float64, pre-activations h [M, k, 2I] float64 of the active slots, NaN elsewhere).
    """
    act = spec.activation
    W13 = qmoe.dequantize(weights.w13).double()
    W2 = qmoe.dequantize(weights.w2).double()
    M, H = x.shape
    I = spec.intermediate_size
    out = torch.zeros(M, H, dtype=torch.float64)
    hs = torch.full((M, topk_ids.shape[1], 2 * I), math.nan, dtype=torch.float64)
    for m in range(M):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[m, j])
            if e == -1:
                continue
            h = W13[e] @ x[m].double()
            if weights.b13 is not None:
                h = h + weights.b13[e].double()
            hs[m, j] = h
            gate, up = h[:I], h[I:]
            if act.limit is not None:
                gate = torch.minimum(gate, torch.tensor(act.limit, dtype=torch.float64))
                up = up.clamp(-act.limit, act.limit)
            a = (up + act.beta) * gate / (1.0 + torch.exp(-act.alpha * gate))
            y = W2[e] @ a
            if weights.b2 is not None:
                y = y + weights.b2[e].double()
            out[m] += float(topk_weights[m, j]) * y
    if shared_output is not None:
        out += shared_output.double()
    return out, hs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def routing_case(spec, M, seed, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, spec.hidden_size, generator=g) * x_scale
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:spec.top_k] for _ in range(M)]).int()
    w = torch.rand(M, spec.top_k, generator=g) + 0.1
    return x, ids, w


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "bf16"])
def test_reference_matches_dense_float64(fmt):
    spec = small_spec()
    weights = random_weights(spec, fmt, seed=1)
    x, ids, w = routing_case(spec, 9, seed=2)
    ids[3] = -1  # a token on no local expert
    ids[5, 1] = -1
    want, _ = dense_moe(spec, weights, x, ids, w)
    got64 = reference_moe(spec, weights, x, ids, w, dtype=torch.float64)
    got32 = reference_moe(spec, weights, x, ids, w, dtype=torch.float32)
    assert got64.dtype == torch.float64 and got32.dtype == torch.float32
    assert rel(got64, want) < 1e-12
    assert rel(got32, want) < 1e-5
    assert (got64[3] == 0).all()


def test_swiglu_limit_is_active_and_matches():
    # inputs 8x larger than unit scale push gate and up past the limit of 7
    spec = small_spec(activation=qmoe.SwiGLU(alpha=1.702, beta=1.0, limit=7.0))
    weights = random_weights(spec, "mxfp4", seed=3)
    x, ids, w = routing_case(spec, 8, seed=4, x_scale=8.0)
    want, h = dense_moe(spec, weights, x, ids, w)
    I = spec.intermediate_size
    assert (h[..., :I] > 7.0).sum() > 20 and (h[..., I:].abs() > 7.0).sum() > 20  # clamping happens
    assert rel(reference_moe(spec, weights, x, ids, w), want) < 1e-12
    # and it changes the answer: without the limit the result is far off
    unlimited = dataclasses.replace(spec, activation=qmoe.SwiGLU(alpha=1.702, beta=1.0))
    assert rel(reference_moe(unlimited, weights, x, ids, w), want) > 0.05


@pytest.mark.parametrize("act", [qmoe.SwiGLU(), qmoe.SwiGLU(alpha=1.702, beta=1.0, limit=7.0),
                                 qmoe.SwiGLU(alpha=0.5, beta=-0.25, limit=2.0)])
def test_swiglu_formula(act):
    gate = torch.linspace(-12, 12, 97, dtype=torch.float64)
    up = torch.linspace(9, -9, 97, dtype=torch.float64)
    want = []
    for g, u in zip(gate.tolist(), up.tolist()):
        if act.limit is not None:
            g, u = min(g, act.limit), max(-act.limit, min(u, act.limit))
        want.append((u + act.beta) * g / (1 + math.exp(-act.alpha * g)))
    got = swiglu(act, gate, up)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_without_bias_shared_output_and_repeated_expert():
    spec = small_spec(bias=False, activation=qmoe.SwiGLU())
    weights = random_weights(spec, "int4", seed=5)
    assert weights.b13 is None and weights.b2 is None
    x, ids, w = routing_case(spec, 6, seed=6)
    ids[2] = torch.tensor([1, 1], dtype=torch.int32)  # the same expert in two slots adds up
    shared = torch.randn(6, spec.hidden_size)
    want, _ = dense_moe(spec, weights, x, ids, w, shared)
    assert rel(reference_moe(spec, weights, x, ids, w, shared_output=shared), want) < 1e-12


def test_empty_batch():
    spec = small_spec()
    weights = random_weights(spec)
    out = reference_moe(spec, weights, torch.zeros(0, spec.hidden_size), torch.zeros(0, 2, dtype=torch.int32),
                        torch.zeros(0, 2))
    assert out.shape == (0, spec.hidden_size) and out.dtype == torch.float64


def test_dequantizes_only_the_active_experts_one_at_a_time(monkeypatch):
    spec = small_spec(E=8)
    weights = random_weights(spec, seed=7)
    seen = []
    real = reference.dequantize

    def spy(q):
        seen.append(q.shape)
        return real(q)

    monkeypatch.setattr(reference, "dequantize", spy)
    x, _, w = routing_case(spec, 4, seed=8)
    ids = torch.tensor([[2, 5], [5, -1], [2, 6], [-1, -1]], dtype=torch.int32)
    reference_moe(spec, weights, x, ids, w)
    H, I = spec.hidden_size, spec.intermediate_size
    assert sorted(seen) == sorted([(2 * I, H), (H, I)] * 3)  # experts 2, 5, 6; one matrix at a time


# --- through qmoe.MoE(backend="reference") --------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -10), (torch.float32, 1e-5)])
def test_moe_reference_writes_into_out_and_follows_x_dtype(dtype, tol):
    spec = small_spec()
    weights = random_weights(spec, seed=9)
    moe = qmoe.MoE(spec, weights, backend="reference")
    x, ids, w = routing_case(spec, 7, seed=10)
    x = x.to(dtype)
    shared = torch.randn(7, spec.hidden_size, dtype=dtype)
    want, _ = dense_moe(spec, weights, x, ids, w, shared)
    out = torch.full((7, spec.hidden_size), math.nan, dtype=dtype)
    ptr = out.data_ptr()
    res = moe.experts(x, ids, w, out=out, shared_output=shared)
    assert res is out and out.data_ptr() == ptr
    assert rel(out, want) < tol
    # out=None: a new tensor of x's dtype; int64 ids and low-precision weights are accepted
    w_low = w.to(dtype)
    fresh = moe.experts(x, ids.long(), w_low)
    assert fresh.dtype == dtype and fresh.shape == (7, spec.hidden_size)
    assert rel(fresh, dense_moe(spec, weights, x, ids, w_low)[0]) < tol


def test_moe_call_routes_then_computes():
    spec = small_spec()
    weights = random_weights(spec, seed=11)
    moe = qmoe.MoE(spec, weights, backend="reference")
    assert moe.backend_for(1) == "reference" and "reference" in moe.explain(5)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5, spec.hidden_size, generator=g).bfloat16()
    logits = torch.randn(5, spec.num_experts, generator=g)
    ids, w = qmoe.route(spec, logits)
    want, _ = dense_moe(spec, weights, x, ids, w)
    out = torch.full((5, spec.hidden_size), math.nan, dtype=torch.bfloat16)
    res = moe(x, logits, out=out)
    assert res is out and rel(out, want) < 2 ** -8


def test_moe_empty_batch():
    spec = small_spec()
    moe = qmoe.MoE(spec, random_weights(spec), backend="reference")
    x = torch.zeros(0, spec.hidden_size, dtype=torch.bfloat16)
    res = moe.experts(x, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2))
    assert res.shape == (0, spec.hidden_size) and res.dtype == torch.bfloat16
    out = torch.empty(0, spec.hidden_size, dtype=torch.bfloat16)
    assert moe(x, torch.zeros(0, spec.num_experts), out=out) is out
