"""qmoe.MoE: every bad input is a ValueError naming the argument, the expected and the given."""

import dataclasses

import pytest
import torch
from conftest import random_weights, small_spec

import qmoe
from qmoe.backends import Support
from qmoe.backends import reference as reference_module

SPEC = small_spec()  # E=4, k=2, H=64, I=32
M, H, E, K = 3, SPEC.hidden_size, SPEC.num_experts, SPEC.top_k


@pytest.fixture(scope="module")
def moe():
    return qmoe.MoE(SPEC, random_weights(SPEC), backend="reference", check_ids="raise")


def good():
    x = torch.randn(M, H, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [-1, 1]], dtype=torch.int32)
    return x, ids, torch.rand(M, K)


def test_good_inputs_run(moe):
    x, ids, w = good()
    out = moe.experts(x, ids, w)
    assert out.shape == (M, H) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(M * H)), rf"x: expected shape \[M, {H}\], got \[{M * H}\]"),
    (dict(x=torch.randn(M, H + 1)), rf"x: expected shape \[M, {H}\], got \[{M}, {H + 1}\]"),
    (dict(x=[[0.0] * H]), rf"x: expected shape \[M, {H}\], got list"),
    (dict(x=torch.randn(M, H, dtype=torch.float64)), r"x: expected dtype bfloat16, float16 or float32, got torch.float64"),
    (dict(x=torch.zeros(M, H, dtype=torch.int32)), r"x: expected dtype bfloat16, float16 or float32, got torch.int32"),
    (dict(x=torch.randn(M, H, device="meta")), r"x: expected device cpu \(where the weights are\), got meta"),
    (dict(ids=torch.zeros(M, K + 1, dtype=torch.int32)), rf"topk_ids: expected shape \[{M}, {K}\], got \[{M}, {K + 1}\]"),
    (dict(ids=torch.zeros(M + 1, K, dtype=torch.int32)), rf"topk_ids: expected shape \[{M}, {K}\], got \[{M + 1}, {K}\]"),
    (dict(ids=[[0, 1]] * M), rf"topk_ids: expected shape \[{M}, {K}\], got list"),
    (dict(ids=torch.zeros(M, K)), r"topk_ids: expected int32 or int64, got torch.float32"),
    (dict(ids=torch.zeros(M, K, dtype=torch.int32, device="meta")), r"topk_ids: expected device cpu .*got meta"),
    (dict(ids=torch.tensor([[0, 1], [2, E], [0, 1]], dtype=torch.int32)),
     rf"topk_ids: expected values in \[-1, {E}\), got values in \[0, {E}\]"),
    (dict(ids=torch.tensor([[0, 1], [-2, 1], [0, 1]])), rf"topk_ids: expected values in \[-1, {E}\), got values in \[-2, 1\]"),
    (dict(w=torch.rand(M, 1)), rf"topk_weights: expected shape \[{M}, {K}\], got \[{M}, 1\]"),
    (dict(w=torch.rand(K)), rf"topk_weights: expected shape \[{M}, {K}\], got \[{K}\]"),
    (dict(w=torch.ones(M, K, dtype=torch.int64)), r"topk_weights: expected a float tensor, got torch.int64"),
    (dict(w=torch.rand(M, K, device="meta")), r"topk_weights: expected device cpu .*got meta"),
    (dict(out=torch.empty(M + 1, H, dtype=torch.bfloat16)), rf"out: expected shape \[{M}, {H}\], got \[{M + 1}, {H}\]"),
    (dict(out=torch.empty(M, H)), r"out: expected dtype torch.bfloat16 \(x's dtype\), got torch.float32"),
    (dict(out=torch.empty(H, M, dtype=torch.bfloat16).T), rf"out: expected a contiguous tensor, got strides \[1, {M}\]"),
    (dict(out=torch.empty(M, H, dtype=torch.bfloat16, device="meta")), r"out: expected device cpu .*got meta"),
    (dict(out="buffer"), rf"out: expected shape \[{M}, {H}\], got str"),
    (dict(shared_output=torch.zeros(M, H + 1)), rf"shared_output: expected shape \[{M}, {H}\], got \[{M}, {H + 1}\]"),
    (dict(shared_output=torch.zeros(M, H, dtype=torch.int32)), r"shared_output: expected a float tensor, got torch.int32"),
])
def test_experts_bad_inputs(moe, change, match):
    x, ids, w = good()
    args = {"x": x, "ids": ids, "w": w, "out": None, "shared_output": None, **change}
    with pytest.raises(ValueError, match=match):
        moe.experts(args["x"], args["ids"], args["w"], out=args["out"], shared_output=args["shared_output"])


def test_out_is_left_alone_when_input_is_rejected(moe):
    x, ids, w = good()
    out = torch.full((M, H), 7.0, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        moe.experts(x, torch.full((M, K), E, dtype=torch.int32), w, out=out)
    assert (out == 7.0).all()


@pytest.mark.parametrize("logits,bias,match", [
    (torch.randn(M + 1, E), None, rf"router_logits: expected shape \[{M}, {E}\], got \[{M + 1}, {E}\]"),
    (torch.randn(M, E + 1), None, rf"router_logits: expected shape \[{M}, {E}\], got \[{M}, {E + 1}\]"),
    (torch.randn(E), None, rf"router_logits: expected shape \[{M}, {E}\], got \[{E}\]"),
    (torch.randn(M, E, device="meta"), None, r"router_logits: expected device cpu .*got meta"),
    (torch.randn(M, E), torch.zeros(E + 1), rf"correction_bias: expected shape \[{E}\], got \[{E + 1}\]"),
])
def test_call_bad_inputs(moe, logits, bias, match):
    x, _, _ = good()
    with pytest.raises(ValueError, match=match):
        moe(x, logits, bias)


def test_constructor_errors():
    weights = random_weights(SPEC)
    with pytest.raises(ValueError, match=r"spec: expected a MoESpec, got str"):
        qmoe.MoE("gpt-oss-20b", weights, backend="reference")
    with pytest.raises(ValueError, match=r"weights: expected an ExpertWeights, got dict"):
        qmoe.MoE(SPEC, {}, backend="reference")
    wrong = dataclasses.replace(SPEC, hidden_size=H + 32)
    with pytest.raises(ValueError, match=r"weights: expected \(num_experts, hidden_size, intermediate_size\) = "
                                         rf"\({E}, {H + 32}, 32\) from the spec, got \({E}, {H}, 32\)"):
        qmoe.MoE(wrong, weights, backend="reference")
    with pytest.raises(ValueError, match=r"backend: expected one of reference, .* or 'auto', got 'fastest'"):
        qmoe.MoE(SPEC, weights, backend="fastest")


def test_a_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setattr(reference_module.BACKEND, "supports",
                        lambda spec, fmt, device: Support(False, "needs a GPU; this is a test"))
    with pytest.raises(ValueError, match=r"backend: reference cannot run format mxfp4 on cpu: needs a GPU; this is a test"):
        qmoe.MoE(SPEC, random_weights(SPEC), backend="reference")


def test_backend_for_and_explain(moe):
    assert moe.backend_for(1) == "reference" and moe.backend_for(4096) == "reference"
    assert moe.explain(16).startswith("M=16: reference")
    assert moe.device.type == "cpu"


# --- the MoE description: MoESpec, SwiGLU, Routing, presets ---------------------------------------

PUBLISHED = {  # (hidden, intermediate, experts, top_k) from the model configs
    "gpt-oss-20b": (2880, 2880, 32, 4), "gpt-oss-120b": (2880, 2880, 128, 4),
    "deepseek-v3": (7168, 2048, 256, 8), "deepseek-v4-flash": (4096, 2048, 256, 6),
    "kimi-k2.5": (7168, 2048, 384, 8), "qwen3-30b-a3b": (2048, 768, 128, 8),
}


def test_presets_have_the_published_shapes_and_parameters():
    assert set(qmoe.presets) == set(PUBLISHED) == set(qmoe.spec.PRESET_FORMATS)
    for name, (h, i, e, k) in PUBLISHED.items():
        s = qmoe.presets[name]
        assert (s.hidden_size, s.intermediate_size, s.num_experts, s.top_k) == (h, i, e, k), name
        assert qmoe.preset(name) is s
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        s = qmoe.presets[name]
        assert s.activation == qmoe.SwiGLU(alpha=1.702, beta=1.0, limit=7.0) and s.bias
        assert s.routing.mode == "softmax" and s.routing.renormalize
    ds3 = qmoe.presets["deepseek-v3"].routing
    assert (ds3.mode, ds3.n_group, ds3.topk_group, ds3.routed_scaling_factor) == ("sigmoid_grouped", 8, 4, 2.5)
    v4 = qmoe.presets["deepseek-v4-flash"]
    assert (v4.routing.mode, v4.routing.routed_scaling_factor) == ("sqrt_softplus", 1.5)
    assert v4.activation == qmoe.SwiGLU(alpha=1.0, beta=0.0, limit=10.0)
    kimi = qmoe.presets["kimi-k2.5"].routing
    assert (kimi.mode, kimi.n_group, kimi.routed_scaling_factor) == ("sigmoid_grouped", 1, 2.827)
    qwen = qmoe.presets["qwen3-30b-a3b"]
    assert qwen.routing.mode == "softmax" and qwen.activation == qmoe.SwiGLU() and not qwen.bias
    assert qmoe.spec.PRESET_FORMATS["gpt-oss-120b"] == "mxfp4" and qmoe.spec.PRESET_FORMATS["kimi-k2.5"] == "int4"
    assert qmoe.presets["gpt-oss-120b"].flops_per_token() == 2 * 4 * 3 * 2880 * 2880


def test_specs_are_frozen_and_replace_makes_variants():
    base = qmoe.presets["gpt-oss-20b"]
    small = dataclasses.replace(base, hidden_size=64, intermediate_size=32)
    assert (small.hidden_size, small.num_experts, small.activation) == (64, 32, base.activation)
    assert base.hidden_size == 2880
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.top_k = 2
    with pytest.raises(ValueError, match=r"preset: expected one of gpt-oss-20b, .*, got 'gpt-5'"):
        qmoe.preset("gpt-5")


@pytest.mark.parametrize("make,match", [
    (lambda: qmoe.MoESpec(0, 1, 64, 32), r"MoESpec.num_experts: expected a positive int, got 0"),
    (lambda: qmoe.MoESpec(4, 2, 64.0, 32), r"MoESpec.hidden_size: expected a positive int, got 64.0"),
    (lambda: qmoe.MoESpec(4, True, 64, 32), r"MoESpec.top_k: expected a positive int, got True"),
    (lambda: qmoe.route(qmoe.MoESpec(4, 5, 64, 32), torch.randn(2, 4)),
     r"MoESpec.top_k: routing chooses top_k distinct experts: expected top_k <= num_experts \(4\), got 5"),
    (lambda: qmoe.MoESpec(4, 2, 64, 32, activation="silu"), r"MoESpec.activation: expected a SwiGLU, got str"),
    (lambda: qmoe.MoESpec(4, 2, 64, 32, routing="softmax"), r"MoESpec.routing: expected a Routing, got str"),
    (lambda: qmoe.MoESpec(6, 2, 64, 32, routing=qmoe.Routing("sigmoid_grouped", n_group=4, topk_group=2)),
     r"MoESpec: num_experts \(6\) must be a multiple of routing.n_group \(4\)"),
    (lambda: qmoe.MoESpec(8, 4, 64, 32, routing=qmoe.Routing("sigmoid_grouped", n_group=4, topk_group=1)),
     r"MoESpec: topk_group x experts per group \(1 x 2\) must be >= top_k \(4\)"),
    (lambda: qmoe.Routing("topk"), r"Routing.mode: expected one of .*, got 'topk'"),
    (lambda: qmoe.Routing("sigmoid_grouped", n_group=2, topk_group=3), r"need 1 <= topk_group <= n_group, got topk_group=3, n_group=2"),
    (lambda: qmoe.Routing(routed_scaling_factor=0.0), r"Routing.routed_scaling_factor: expected a positive number, got 0.0"),
    (lambda: qmoe.SwiGLU(limit=0.0), r"SwiGLU.limit: expected None or a finite positive number, got 0.0"),
    (lambda: qmoe.SwiGLU(alpha=float("inf")), r"SwiGLU.alpha: expected a finite number, got inf"),
])
def test_spec_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()
