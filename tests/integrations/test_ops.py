"""The custom ops: schema (only `out` mutated), fake implementations, results written into the
caller's buffer, the handle registry, and torch.compile with one graph for every token count."""

import gc

import pytest
import torch
import torch._dynamo.testing

import qmoe
from qmoe.nn import MoELayer, ops

from conftest import random_weights


@pytest.fixture
def moe(spec, weights):
    return qmoe.MoE(spec, weights, backend="reference")


def routing_inputs(spec, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, spec.hidden_size, generator=g)
    logits = torch.randn(M, spec.num_experts, generator=g)
    return x, logits


def test_schemas_mutate_only_out():
    for op in (torch.ops.qmoe.experts.default, torch.ops.qmoe.route_experts.default):
        mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert mutated == ["out"]
        assert len(op._schema.returns) == 0
        assert str(op._schema.arguments[-1].type) == "int"  # the handle: a plain int, never symbolic


def test_ops_write_into_the_callers_buffer(spec, moe):
    handle = ops.register(moe)
    x, logits = routing_inputs(spec, 5)
    ids, w = qmoe.route(spec, logits)
    buf = torch.full((5, spec.hidden_size), float("nan"))
    got = ops.experts(handle, x, ids, w, out=buf)
    assert got is buf
    assert torch.equal(buf, moe.experts(x, ids, w))
    buf2 = torch.full_like(buf, float("nan"))
    shared = torch.randn(5, spec.hidden_size)
    assert ops.route_experts(handle, x, logits, None, buf2, shared) is buf2
    assert torch.equal(buf2, moe(x, logits, shared_output=shared))
    assert torch.equal(ops.experts(handle, x, ids, w), buf)  # out=None: allocated


def test_opcheck_schema_and_fake(spec, moe):
    """torch.library.opcheck: the schema matches what the op does, the fake implementation matches
    the real one (shapes, and that only out is written), under dynamic shapes too."""
    handle = ops.register(moe)
    x, logits = routing_inputs(spec, 6)
    ids, w = qmoe.route(spec, logits)
    out = torch.empty(6, spec.hidden_size)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.qmoe.experts.default, (x, ids, w, out, None, handle), test_utils=utils)
    torch.library.opcheck(torch.ops.qmoe.route_experts.default, (x, logits, None, out, None, handle),
                          test_utils=utils)


def test_handles_are_weak_and_checked(spec, weights):
    moe = qmoe.MoE(spec, weights, backend="reference")
    h = ops.register(moe)
    assert ops.lookup(h) is moe
    del moe
    gc.collect()
    with pytest.raises(ValueError, match=f"handle: no live qmoe.MoE is registered under {h}"):
        ops.lookup(h)
    x, logits = routing_inputs(spec, 2)
    with pytest.raises(ValueError, match="no live qmoe.MoE"):
        ops.route_experts(h, x, logits)
    with pytest.raises(ValueError, match="moe: expected a qmoe.MoE, got str"):
        ops.register("not a moe")
    with pytest.raises(ValueError, match="handle: expected a handle"):
        ops.register(qmoe.MoE(spec, weights, backend="reference"), handle=0)


def test_validation_is_the_moes(spec, moe):
    h = ops.register(moe)
    x, logits = routing_inputs(spec, 3)
    with pytest.raises(ValueError, match=r"out: expected shape \[3, 64\], got \[2, 64\]"):
        ops.route_experts(h, x, logits, out=torch.empty(2, spec.hidden_size))


def layer_for(spec, weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MoELayer(spec, weights, torch.randn(spec.num_experts, spec.hidden_size, generator=g),
                    torch.randn(spec.num_experts, generator=g), backend="reference")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layer_one_graph_for_every_token_count(spec, weights, backend):
    torch._dynamo.reset()
    layer = layer_for(spec, weights)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for M in (3, 8, 13):
        x = torch.randn(2, M, spec.hidden_size)
        torch._dynamo.mark_dynamic(x, 1)
        assert torch.equal(compiled(x), layer(x))
    assert counter.frame_count == 1  # one compile: the plan's per-M choice lives inside the op
    assert counter.op_count >= 1


def test_compiled_experts_from_given_routing(spec, weights):
    """layer.experts (torch.ops.qmoe.experts) under fullgraph compile, routing computed in the graph."""
    torch._dynamo.reset()
    layer = layer_for(spec, weights)

    def f(x):
        ids, w = qmoe.routing.reference.route(spec, layer.router_logits(x))
        return layer.experts(x, ids, w)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for M in (4, 9):
        x = torch.randn(M, spec.hidden_size)
        torch._dynamo.mark_dynamic(x, 0)
        assert torch.equal(compiled(x), f(x))
    assert counter.frame_count == 1


def test_a_second_layer_has_its_own_handle(spec):
    a, b = layer_for(spec, random_weights(spec, seed=1)), layer_for(spec, random_weights(spec, seed=2))
    assert a.handle != b.handle
    x = torch.randn(4, spec.hidden_size)
    assert not torch.equal(a(x), b(x))

