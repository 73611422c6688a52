"""The fused routing kernel (kernels/routing.py) against the reference (qmoe.routing.reference),
and qmoe.route, the one public routing that MoE runs.

On a CPU the kernel runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1);
logits are tie-free (distinct values exactly representable in bf16), so ids must match
exactly and weights to 1e-6 relative.
"""

import pytest
import torch

import qmoe
from conftest import random_weights, small_spec
from qmoe import MoESpec, Routing, routing
from qmoe.kernels import routing as kr
from qmoe.routing.reference import route as reference_route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tie_free_logits(M, E, dtype=torch.float32, seed=0):
    """[M, E]: each row E distinct values of a grid of step 8 / max(128, 2E) on [-4, 4), drawn
    at random: exact in bf16 up to E = 64, and never saturating sigmoid or softplus into ties."""
    g = torch.Generator().manual_seed(seed)
    n = max(128, 2 * E)
    rows = [torch.randperm(n, generator=g)[:E] for _ in range(M)]
    x = torch.stack(rows).float() * (8 / n) - 4 if M else torch.empty(0, E)
    return x.to(dtype).to(DEVICE)


def bias_for(E, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, generator=g) * 0.3).to(DEVICE)


def check_same(spec, logits, bias=None, out=None):
    r = spec.routing
    want_ids, want_w = reference_route(spec, logits, bias)
    ids, w = kr.fused_route(logits, spec.top_k, r.mode, r.renormalize, r.routed_scaling_factor, r.n_group,
                            r.topk_group, bias, *(out or ()))
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == w.shape == (logits.shape[0], spec.top_k)
    assert torch.equal(ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(w.cpu(), want_w.cpu(), rtol=1e-6, atol=0)
    return ids, w


SHAPES = [(0, 8, 2), (1, 8, 2), (3, 6, 3), (3, 20, 4), (5, 64, 8), (2, 1, 1)]


@pytest.mark.parametrize("M,E,k", SHAPES)
@pytest.mark.parametrize("renormalize,scale", [(True, 1.0), (False, 1.0), (True, 2.5), (False, 0.75)])
def test_softmax(M, E, k, renormalize, scale):
    check_same(MoESpec(E, k, 32, 32, routing=Routing("softmax", renormalize, routed_scaling_factor=scale)),
               tie_free_logits(M, E, seed=M * 100 + E))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_softmax_other_logit_dtypes(dtype):
    check_same(MoESpec(20, 4, 32, 32), tie_free_logits(3, 20, dtype))


def test_softmax_ignores_bias_and_refuses_groups():
    check_same(MoESpec(8, 2, 32, 32), tie_free_logits(3, 8), bias_for(8))
    with pytest.raises(ValueError, match="Routing.n_group: softmax routing has no expert groups"):
        Routing("softmax", True, n_group=4, topk_group=1)


def test_largest_sizes():
    """E = 512, k = 16: the most the kernel takes; 384 (Kimi-K2.5) pads to 512."""
    check_same(MoESpec(512, 16, 32, 32), tie_free_logits(2, 512))
    check_same(MoESpec(384, 8, 32, 32, routing=Routing("sigmoid_grouped", True, routed_scaling_factor=2.827)),
               tie_free_logits(1, 384), bias_for(384))


# (E, k, n_group, topk_group): no group limit; groups of a power of two; groups of 5, 3 and 1
GROUPED = [(8, 2, 1, 1), (16, 4, 4, 2), (20, 4, 4, 2), (6, 2, 2, 1), (8, 3, 8, 3), (1, 1, 1, 1)]


@pytest.mark.parametrize("mode", ["sigmoid_grouped", "sqrt_softplus"])
@pytest.mark.parametrize("E,k,n_group,topk_group", GROUPED)
@pytest.mark.parametrize("M", [0, 1, 3])
def test_scores_with_bias_and_groups(mode, E, k, n_group, topk_group, M):
    spec = MoESpec(E, k, 32, 32, routing=Routing(mode, True, n_group, topk_group, routed_scaling_factor=2.5))
    logits = tie_free_logits(M, E, seed=E + M)
    check_same(spec, logits, bias_for(E))
    check_same(spec, logits)


@pytest.mark.parametrize("mode", ["sigmoid_grouped", "sqrt_softplus"])
def test_scores_without_renormalize_bf16(mode):
    spec = MoESpec(20, 4, 32, 32, routing=Routing(mode, False, 4, 2, routed_scaling_factor=1.5))
    check_same(spec, tie_free_logits(3, 20, torch.bfloat16), bias_for(20).to(torch.bfloat16))


def test_group_limit_changes_the_answer():
    """The hand-worked case of tests/test_routing.py: groups 1 and 2 win, so expert 0 (the
    single best score) is out."""
    logits = torch.tensor([[3.0, -3.0, 2.0, 1.9, 1.5, 1.5, -2.0, -2.0]], device=DEVICE)
    ids, _ = kr.fused_route(logits, 2, "sigmoid_grouped", True, 1.0, 4, 2)
    assert ids.tolist() == [[2, 3]]


def test_sqrt_softplus_extremes():
    """Large |x|: softplus is x above 20 (as torch) and exp(x) below -20 without losing digits."""
    logits = torch.tensor([[30.0, 21.0, 19.5, 3.0, 0.0, -5.0, -19.0, -25.0]], device=DEVICE)
    spec = MoESpec(8, 8, 32, 32, routing=Routing("sqrt_softplus", False))
    check_same(spec, logits)


def test_writes_into_given_buffers_and_strided_logits():
    spec = MoESpec(20, 4, 32, 32)
    logits = tie_free_logits(3, 40)[:, ::2]  # column stride 2
    ids_buf = torch.full((3, 4), -7, dtype=torch.int32, device=DEVICE)
    w_buf = torch.full((3, 4), float("nan"), device=DEVICE)
    ids, w = check_same(spec, logits, out=(ids_buf, w_buf))
    assert ids is ids_buf and w is w_buf


def test_ties_go_to_the_lower_id():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]], device=DEVICE)
    ids, w = kr.fused_route(logits, 3, "softmax", True, 1.0)
    assert ids.tolist() == [[1, 2, 4]]
    torch.testing.assert_close(w.cpu(), torch.full((1, 3), 1 / 3))


def test_rejects_bad_input():
    x = torch.zeros(2, 8, device=DEVICE)
    # shapes are qmoe.route's to check (one validation); the host entry checks its own parameters
    with pytest.raises(ValueError, match=r"router_logits: expected shape \[M, 8\], got \[8\]"):
        qmoe.route(MoESpec(8, 2, 32, 32), x[0])
    with pytest.raises(ValueError, match=r"correction_bias: expected shape \[8\], got \[7\]"):
        qmoe.route(MoESpec(8, 2, 32, 32, routing=Routing("sigmoid_grouped")), x, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="logits: expected dtype float32, bfloat16, float16 or float64, got torch.int32"):
        kr.fused_route(x.int(), 2, "softmax", True, 1.0)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 8\] \(E = 8, at most 16\), got 9"):
        kr.fused_route(x, 9, "softmax", True, 1.0)
    with pytest.raises(ValueError, match="mode: expected one of softmax, sigmoid_grouped, sqrt_softplus, "
                                         "got 'top1'"):
        kr.fused_route(x, 2, "top1", True, 1.0)
    with pytest.raises(ValueError, match="logits: expected at most 512 experts"):
        kr.fused_route(torch.zeros(1, 513, device=DEVICE), 2, "softmax", True, 1.0)
    with pytest.raises(ValueError, match=r"n_group: expected a positive divisor of E \(8\), got 3"):
        kr.fused_route(x, 2, "sigmoid_grouped", True, 1.0, 3, 1)
    with pytest.raises(ValueError, match=r"out_ids: expected a contiguous torch.int32 tensor of shape \[2, 2\]"):
        kr.fused_route(x, 2, "softmax", True, 1.0, out_ids=torch.zeros(2, 2, dtype=torch.int64, device=DEVICE))


def test_supports_says_why_not():
    assert kr.supports("softmax", 512, 16) == (True, "fused Triton routing kernel (softmax, one launch)")
    ok, why = kr.supports("softmax", 1024, 4)
    assert not ok and why == "num_experts 1024 > 512, the most one program holds in registers"
    ok, why = kr.supports("softmax", 64, 32)
    assert not ok and why == "top_k 32 > 16 (the kernel unrolls one reduction per pick)"
    ok, why = kr.supports("noaux", 64, 4)
    assert not ok and why == "routing mode 'noaux' is not one of softmax, sigmoid_grouped, sqrt_softplus"


@pytest.mark.parametrize("mode,n_group,topk_group", [("softmax", 1, 1), ("sigmoid_grouped", 4, 2)])
def test_several_rows_per_program(monkeypatch, mode, n_group, topk_group):
    """Above ROWS_ONE_PER_PROGRAM rows a program takes several; the last one partly past M."""
    monkeypatch.setattr(kr, "ROWS_ONE_PER_PROGRAM", 2)
    assert kr.launch_config(7, 16) == (4, 1)
    spec = MoESpec(16, 3, 32, 32, routing=Routing(mode, True, n_group, topk_group, routed_scaling_factor=2.5))
    logits = tie_free_logits(7, 16, seed=3)
    check_same(spec, logits, bias_for(16) if mode != "softmax" else None)


# --- qmoe.route: what MoE runs ------------------------------------------------------------------
def test_the_public_route_is_the_one_moe_runs():
    assert qmoe.route is routing.route is qmoe.moe.route


def test_route_on_cpu_is_the_reference(monkeypatch):
    spec = qmoe.presets["deepseek-v3"]
    sup = routing.routing_support(spec, "cpu")
    assert not sup.ok and sup.reason == ("reference routing in PyTorch: the fused kernel needs CUDA logits, "
                                         "got cpu")

    def boom(*a, **kw):
        raise AssertionError("the fused kernel must not run on the CPU")

    monkeypatch.setattr(kr, "fused_route", boom)
    logits = torch.randn(5, spec.num_experts)
    bias = torch.randn(spec.num_experts)
    got, want = qmoe.route(spec, logits, bias), reference_route(spec, logits, bias)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_route_validates_once():
    with pytest.raises(ValueError, match=r"router_logits: expected shape \[M, 4\], got \[3, 5\]"):
        qmoe.route(MoESpec(4, 2, 32, 32), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="spec: expected a MoESpec, got str"):
        qmoe.route("gpt-oss-20b", torch.zeros(3, 5))


def test_moe_call_routes_through_the_public_route(monkeypatch):
    spec = small_spec()
    moe = qmoe.MoE(spec, random_weights(spec), backend="reference")
    seen = []
    real = routing.route
    monkeypatch.setattr(qmoe.moe, "route", lambda *a: seen.append(a) or real(*a))
    x, logits = torch.randn(2, spec.hidden_size), torch.randn(2, spec.num_experts)
    out = moe(x, logits)
    assert len(seen) == 1 and torch.equal(out, moe.experts(x, *reference_route(spec, logits)))


@gpu
def test_route_fuses_on_gpu_and_captures():
    spec = qmoe.presets["deepseek-v3"]
    assert routing.routing_support(spec, "cuda").ok
    logits, bias = tie_free_logits(7, spec.num_experts), bias_for(spec.num_experts)
    ids, w = qmoe.route(spec, logits, bias)
    want_ids, want_w = reference_route(spec, logits, bias)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=0)  # GPU exp / log are not torch's
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_ids, g_w = qmoe.route(spec, logits, bias)
    logits.copy_(tie_free_logits(7, spec.num_experts, seed=5))
    graph.replay()
    want_ids, want_w = reference_route(spec, logits, bias)
    assert torch.equal(g_ids, want_ids)
    torch.testing.assert_close(g_w, want_w, rtol=1e-5, atol=0)

