"""qmoe.nn.MoELayer: forward against qmoe.MoE, buffers and state_dict, dtype and device moves
(re-planning), copies, shared experts, argument errors; on the GPU a real-shape layer."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import qmoe
from qmoe.nn import MoELayer, ops

from conftest import random_weights, small_spec


def make_layer(spec, fmt="mxfp4", seed=0, backend="reference", **kw):
    g = torch.Generator().manual_seed(seed)
    w = random_weights(spec, fmt, seed=seed)
    return MoELayer(spec, w, torch.randn(spec.num_experts, spec.hidden_size, generator=g),
                    torch.randn(spec.num_experts, generator=g), backend=backend, **kw)


def test_forward_is_route_then_experts(spec):
    layer = make_layer(spec)
    x = torch.randn(2, 3, spec.hidden_size)
    flat = x.reshape(6, -1)
    logits = flat @ layer.router_weight.T + layer.router_bias
    want = layer.moe(flat, logits)
    assert torch.equal(layer(x), want.view(2, 3, -1))
    ids, w = qmoe.route(spec, logits)
    assert torch.equal(layer.experts(x, ids, w), want.view(2, 3, -1))


def test_router_dtype_and_correction_bias():
    spec = small_spec(E=8, k=2, bias=False, routing=qmoe.Routing("sigmoid_grouped", n_group=4, topk_group=2,
                                                                  routed_scaling_factor=2.0))
    w = random_weights(spec, "int4")
    rw, cb = torch.randn(8, spec.hidden_size), torch.randn(8) * 0.5
    layer = MoELayer(spec, w, rw.bfloat16(), correction_bias=cb, backend="reference", router_dtype=torch.float32)
    x = torch.randn(5, spec.hidden_size, dtype=torch.bfloat16)
    logits = x.float() @ rw.bfloat16().float().T
    torch.testing.assert_close(layer.router_logits(x), logits)
    assert layer.router_logits(x).dtype == torch.float32
    want = layer.moe(x, logits, cb)
    assert torch.equal(layer(x), want)
    plain = MoELayer(spec, w, rw.bfloat16(), backend="reference", router_dtype=torch.float32)
    assert not torch.equal(plain(x), want)  # the correction bias changes the selection


def test_shared_experts_output_is_added(spec):
    shared = nn.Linear(spec.hidden_size, spec.hidden_size)
    layer = make_layer(spec, shared_experts=shared)
    bare = make_layer(spec)
    x = torch.randn(4, spec.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), bare(x) + shared(x), rtol=1e-6, atol=1e-6)
        given = torch.randn(4, spec.hidden_size)
        torch.testing.assert_close(bare(x, shared_output=given), bare(x) + given, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "bf16"])
def test_state_dict_round_trip(fmt):
    spec = small_spec()
    layer = make_layer(spec, fmt)
    sd = layer.state_dict()
    expected = {"w13_data", "w13_scales", "w2_data", "w2_scales", "b13", "b2", "router_weight", "router_bias"}
    if fmt == "nvfp4":
        expected |= {"w13_global_scale", "w2_global_scale"}
    if fmt == "bf16":
        expected -= {"w13_scales", "w2_scales"}
    assert set(sd) == expected
    fresh = MoELayer.empty(spec, fmt, router_bias=True, backend="reference")
    x = torch.randn(6, spec.hidden_size)
    before = fresh(x)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), layer(x))  # re-planned after loading: the new weights run
    assert not torch.equal(before, fresh(x))
    for a, b in ((layer.weights.w13, fresh.weights.w13), (layer.weights.w2, fresh.weights.w2)):
        assert torch.equal(a.data, b.data)


def test_dtype_moves_leave_the_quantized_weights_alone():
    spec = small_spec()
    layer = make_layer(spec, "nvfp4")
    w = layer.weights
    moe = layer.moe
    layer.to(torch.bfloat16)
    assert layer.router_weight.dtype == torch.bfloat16 and layer.router_bias.dtype == torch.bfloat16
    after = layer.weights
    assert after.w13.scales.dtype == torch.float8_e4m3fn and after.w13.global_scale.dtype == torch.float32
    assert after.b13.dtype == torch.float32
    assert torch.equal(after.w13.global_scale, w.w13.global_scale)  # not rounded through bf16
    assert torch.equal(after.b2, w.b2)
    assert layer.moe is moe  # nothing moved: no re-plan
    x = torch.randn(3, spec.hidden_size, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_new_tensors_re_plan_and_meta_has_no_plan(spec):
    layer = make_layer(spec)
    moe = layer.moe
    layer._apply(lambda t: t.clone())
    assert layer.moe is not moe and ops.lookup(layer.handle) is layer.moe
    layer.to("meta")
    with pytest.raises(ValueError, match="layer: no backend plan on device meta"):
        _ = layer.moe
    with pytest.raises(ValueError, match="no live qmoe.MoE"):
        ops.lookup(layer.handle)


def test_deepcopy_plans_its_own(spec):
    layer = make_layer(spec)
    twin = copy.deepcopy(layer)
    assert twin.handle != layer.handle and twin.moe is not layer.moe
    x = torch.randn(3, spec.hidden_size)
    assert torch.equal(twin(x), layer(x))
    with torch.no_grad():
        twin.router_bias += 5 * torch.arange(spec.num_experts)  # a different choice for the copy only
    assert not torch.equal(twin(x), layer(x))


def test_extra_repr_shows_the_facts():
    spec = qmoe.presets["gpt-oss-20b"]
    spec = dataclasses.replace(spec, num_experts=4, hidden_size=64, intermediate_size=64)
    text = repr(make_layer(spec))
    for part in ("gpt-oss-20b", "num_experts=4", "top_k=4", "hidden_size=64", "intermediate_size=64",
                 "format=mxfp4", "SwiGLU(alpha=1.702, beta=1, limit=7.0)", "routing=softmax", "expert biases",
                 "router bias", "backend=reference (reference on cpu)"):
        assert part in text


def test_argument_errors(spec):
    w = random_weights(spec)
    E, H = spec.num_experts, spec.hidden_size
    with pytest.raises(ValueError, match=r"router_weight: expected a float tensor of shape \[4, 64\], got "
                                         r"torch.float32 \[64, 4\]"):
        MoELayer(spec, w, torch.randn(H, E))
    with pytest.raises(ValueError, match=r"router_bias: expected a float tensor of shape \[4\]"):
        MoELayer(spec, w, torch.randn(E, H), torch.randn(E + 1))
    with pytest.raises(ValueError, match="router_dtype: expected None or a float dtype"):
        MoELayer(spec, w, torch.randn(E, H), router_dtype=torch.int32)
    with pytest.raises(ValueError, match="weights: expected an ExpertWeights"):
        MoELayer(spec, "w", torch.randn(E, H))
    layer = make_layer(spec)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 64\], got \[3, 32\]"):
        layer(torch.randn(3, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_shape_layer_on_the_gpu():
    """A gpt-oss-120b layer (E=128, H=I=2880) through MoELayer on the GPU (backend auto), against the
    same layer's reference backend; then moved to the CPU and back (re-planned each time)."""
    spec = qmoe.presets["gpt-oss-120b"]
    w = qmoe.random_weights(spec, "mxfp4", device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    rw = torch.randn(spec.num_experts, spec.hidden_size, device="cuda", generator=g) / spec.hidden_size ** 0.5
    layer = MoELayer(spec, w, rw.bfloat16(), torch.zeros(spec.num_experts, device="cuda"))
    ref = MoELayer(spec, w, rw.bfloat16(), torch.zeros(spec.num_experts, device="cuda"), backend="reference")
    for M in (1, 16, 300):
        x = torch.randn(M, spec.hidden_size, device="cuda", generator=g).bfloat16()
        got, want = layer(x), ref(x)
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        print(f"M={M}: {layer.explain(M).splitlines()[0]}; rel. error vs reference {rel:.2e}")
        assert rel < 1e-2
    layer.to("cpu")
    assert layer.moe.device.type == "cpu"
    layer.to("cuda")
    assert layer.moe.device.type == "cuda" and layer.moe.backend_for(16) != "reference"


def test_training_through_the_layer_is_refused(spec):
    layer = make_layer(spec)
    x = torch.randn(3, spec.hidden_size, requires_grad=True)
    with pytest.raises(ValueError, match="x: qmoe's MoE layer is inference-only"):
        layer(x)
    layer.eval()
    assert layer(x).shape == x.shape  # eval: the output simply carries no gradient to x
    layer.train()
    with torch.no_grad():
        assert layer(x).shape == x.shape
