"""The splits of experts and of the intermediate dimension, and the weight shards with their
inverses (in-process: no torch.distributed)."""

import pytest
import torch
from conftest import assert_same_weights, random_weights, small_spec

import qmoe
from qmoe.parallel import (ParallelPlan, expert_range, gather_experts, gather_intermediate, intermediate_range,
                           shard_experts, shard_intermediate, shard_weights)


def test_expert_range_first_ranks_take_the_remainder():
    assert [expert_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert [expert_range(8, r, 2) for r in range(2)] == [(0, 4), (4, 4)]
    assert [expert_range(384, r, 8)[1] for r in range(8)] == [48] * 8
    assert expert_range(5, 0, 1) == (0, 5)


def test_intermediate_range_cuts_on_blocks():
    # gpt-oss I = 2880 = 90 mxfp4 blocks of 32 over 4 ranks: 23, 23, 22, 22 blocks
    assert [intermediate_range(2880, "mxfp4", r, 4) for r in range(4)] == \
        [(0, 736), (736, 1472), (1472, 2176), (2176, 2880)]
    assert [intermediate_range(80, "nvfp4", r, 2) for r in range(2)] == [(0, 48), (48, 80)]
    assert intermediate_range(2048, "int4", 7, 8) == (1792, 2048)
    assert [intermediate_range(6, "bf16", r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 6)]


@pytest.mark.parametrize("call,match", [
    (lambda: expert_range(3, 0, 4), r"num_experts: expected at least one expert per rank \(4 ranks\), got 3"),
    (lambda: expert_range(8, 2, 2), r"rank: expected 0 <= rank < world_size = 2 \(world_size >= 1\), got 2"),
    (lambda: expert_range(8, 0, 0), r"rank: expected 0 <= rank < world_size = 0"),
    (lambda: expert_range(8, 0, 2.0), r"world_size: expected an int, got 2.0"),
    (lambda: intermediate_range(64, "mxfp4", 0, 4),
     r"intermediate_size: 64 is 2 mxfp4 block\(s\) of 32; 4 tensor-parallel ranks need at least one block each"),
    (lambda: intermediate_range(40, "mxfp4", 0, 1), r"intermediate_size: expected a multiple of the mxfp4 block \(32\), got 40"),
    (lambda: intermediate_range(64, "fp8", 0, 1), r"format: expected one of"),
])
def test_range_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_experts_round_trip(fmt, world):
    spec = small_spec(E=10, I=64)
    w = random_weights(spec, fmt)
    shards = [shard_experts(w, r, world) for r in range(world)]
    assert [s.num_experts for s in shards] == [expert_range(10, r, world)[1] for r in range(world)]
    assert_same_weights(gather_experts(shards), w)
    first, count = expert_range(10, world - 1, world)
    assert torch.equal(shards[-1].w2.data, w.w2.data[first:first + count])


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_intermediate_round_trip(fmt, world):
    spec = small_spec(E=3, H=64, I=160)
    w = random_weights(spec, fmt)
    shards = [shard_intermediate(w, r, world) for r in range(world)]
    assert_same_weights(gather_intermediate(shards), w)
    for r, s in enumerate(shards):
        lo, hi = intermediate_range(160, fmt, r, world)
        assert s.intermediate_size == hi - lo
        # each slice dequantizes to the same values as the slice of the whole (nvfp4: same global scale)
        w13, w2 = w.dequantize_expert(1)
        s13, s2 = s.dequantize_expert(1)
        assert torch.equal(s13, torch.cat([w13[lo:hi], w13[160 + lo:160 + hi]]))
        assert torch.equal(s2, w2[:, lo:hi])
        assert torch.equal(s.b13, torch.cat([w.b13[:, lo:hi], w.b13[:, 160 + lo:160 + hi]], dim=1))
        assert torch.equal(s.b2, w.b2 if r == 0 else torch.zeros_like(w.b2)), "b2 is rank 0's only"


def test_shard_weights_composes_and_world_one_is_identity():
    spec = small_spec(E=8, I=64)
    w = random_weights(spec, "nvfp4")
    assert shard_weights(w) is w
    s = shard_weights(w, ep_rank=1, ep_size=2, tp_rank=1, tp_size=2)
    assert (s.num_experts, s.intermediate_size) == (4, 32)
    assert torch.equal(s.w2.data, w.w2.data[4:8, :, 16:32]) and torch.equal(s.w2.global_scale, w.w2.global_scale[4:8])
    assert not s.b2.any()


def test_plan_refuses_before_touching_torch_distributed():
    spec = small_spec(E=8)
    w = random_weights(spec)
    with pytest.raises(ValueError, match=r"ep_group, tp_group: expected at least one torch.distributed group"):
        ParallelPlan(spec, w, "reference")
    with pytest.raises(ValueError, match=r"max_tokens: sizes the expert-parallel buffers; expected None without ep_group"):
        ParallelPlan(spec, w, "reference", tp_group=object(), max_tokens=4)
    with pytest.raises(ValueError, match=r"max_tokens: expected None or a positive int, got 0"):
        ParallelPlan(spec, w, "reference", ep_group=object(), max_tokens=0)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match=r"ep_group: torch.distributed is not initialized"):
            ParallelPlan(spec, w, "reference", ep_group=object())
    with pytest.raises(ValueError, match=r"weights: expected an ExpertWeights"):
        ParallelPlan(spec, w.w13, "reference", ep_group=object())


def test_plan_shapes_of_weights(monkeypatch):
    """The whole layer or this rank's shard is accepted; anything else names both shapes."""
    import qmoe.parallel.plan as plan_mod

    spec = small_spec(E=8, I=64)
    w = random_weights(spec)
    monkeypatch.setattr(plan_mod, "group_info", lambda name, g, dev: plan_mod.GroupInfo(None, 1, 2))
    whole = ParallelPlan(spec, w, "reference", ep_group=object(), tp_group=object())
    shard = ParallelPlan(spec, shard_weights(w, ep_rank=1, ep_size=2, tp_rank=1, tp_size=2), "reference",
                         ep_group=object(), tp_group=object())
    assert_same_weights(whole.weights, shard.weights)
    given = ParallelPlan(spec, shard_experts(w, 1, 2), "reference", ep_group=object(), tp_group=object())
    assert not given.weights.b2.any(), "a given shard's b2 is rank 0's to add"
    assert whole.local_spec == qmoe.MoESpec(4, spec.top_k, spec.hidden_size, 32, spec.activation, bias=True, name=spec.name)
    with pytest.raises(ValueError, match=r"weights: expected \(num_experts, hidden_size, intermediate_size\) = "
                                         r"\(8, 64, 64\) \(the whole layer\) or \(4, 64, 32\) \(this rank's shard\), "
                                         r"got \(2, 64, 64\)"):
        ParallelPlan(spec, shard_experts(w, 1, 4), "reference", ep_group=object(), tp_group=object())
