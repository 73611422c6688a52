"""The batched activation format (per-expert buffers [E, T, H] + counts [E]): Backend.forward_batched's
fallback and qmoe.parallel.experts_batched, against the float64 reference per expert."""

import pytest
import torch
from conftest import random_weights, small_spec

from qmoe.backends import get_backend
from qmoe.backends.reference import reference_moe, relative_error
from qmoe.dispatch import make_plan
from qmoe.parallel import experts_batched

SPEC = small_spec(E=4, k=2)
T = 5


def buffers(counts, dtype=torch.bfloat16, seed=0):
    """x [E, T, H] with NaN in the unused rows (they must not reach any result)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SPEC.num_experts, T, SPEC.hidden_size, generator=g).to(dtype)
    for e, c in enumerate(counts.tolist()):
        x[e, max(c, 0):] = float("nan")
    return x


def expected(weights, x, counts):
    """Each row in use through its expert alone, weight 1, in float64; unused rows 0."""
    want = torch.zeros(x.shape, dtype=torch.float64)
    for e, c in enumerate(counts.clamp(0, T).tolist()):
        if c:
            ids = torch.full((c, 1), e, dtype=torch.int32)
            spec1 = small_spec(E=SPEC.num_experts, k=1)
            want[e, :c] = reference_moe(spec1, weights, x[e, :c], ids, torch.ones(c, 1))
    return want


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_batched_fallback(backend):
    weights = random_weights(SPEC)
    counts = torch.tensor([3, 0, 5, 1], dtype=torch.int32)
    x = buffers(counts)
    b = get_backend(backend)
    prepared = b.prepare(SPEC, weights)
    out = torch.full_like(x, 7.0)
    assert b.forward_batched(prepared, x, counts, out) is out
    want = expected(weights, x, counts)
    used = torch.arange(T) < counts.unsqueeze(1)
    assert torch.equal(out[~used], torch.zeros_like(out[~used])), "rows past the count are 0"
    assert relative_error(out[used], want[used]) < 1e-2


def test_counts_outside_the_buffer_act_as_clamped():
    weights = random_weights(SPEC)
    counts = torch.tensor([-2, 9, 0, 5], dtype=torch.int64)
    x = buffers(counts, torch.float32, seed=1)
    out = experts_batched(make_plan(SPEC, weights, "reference"), x, counts)
    want = expected(weights, x, counts)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()
    assert relative_error(out, want) < 1e-5


def test_experts_batched_matches_the_token_layout():
    """Row t of expert e is the same as token t routed to e alone through forward."""
    weights = random_weights(SPEC)
    plan = make_plan(SPEC, weights, "reference")
    counts = torch.tensor([2, 5, 0, 3], dtype=torch.int32)
    x = buffers(counts, torch.float32, seed=2)
    out = experts_batched(plan, x, counts)
    for e, c in enumerate(counts.tolist()):
        if c:
            ids = torch.tensor([[e, -1]] * c, dtype=torch.int32)
            row = torch.empty(c, SPEC.hidden_size)
            plan.runner(c)[1](x[e, :c].contiguous(), ids, torch.ones(c, 2), row)
            assert relative_error(out[e, :c], row) < 1e-6


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(3, T, 64)), r"x: expected shape \[4, T, 64\] \(local experts, rows per expert, hidden\), got \[3, 5, 64\]"),
    (dict(x=torch.zeros(4, T, 64, dtype=torch.float64)), r"x: expected dtype bfloat16, float16 or float32, got torch.float64"),
    (dict(x=torch.zeros(4, 64, T).transpose(1, 2)), r"x: expected a contiguous tensor"),
    (dict(counts=torch.zeros(4)), r"counts: expected int32 or int64 of shape \[4\], got torch.float32 \[4\]"),
    (dict(counts=torch.zeros(5, dtype=torch.int32)), r"counts: expected int32 or int64 of shape \[4\], got torch.int32 \[5\]"),
    (dict(counts=torch.zeros(4, dtype=torch.int32, device="meta")), r"counts: expected device cpu, got meta"),
    (dict(out=torch.zeros(4, T, 64, dtype=torch.float16)), r"out: expected a contiguous torch.float32 tensor of shape \[4, 5, 64\]"),
    (dict(plan="triton"), r"plan: expected a qmoe.dispatch.Plan or a ParallelPlan, got str"),
])
def test_experts_batched_errors(change, match):
    args = dict(plan=make_plan(SPEC, random_weights(SPEC), "reference"), x=torch.zeros(4, T, 64),
                counts=torch.zeros(4, dtype=torch.int32), out=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        experts_batched(args["plan"], args["x"], args["counts"], args["out"])
