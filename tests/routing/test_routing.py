"""qmoe.route: every routing mode against small cases computed by hand (math module, float64)."""

import math

import pytest
import torch

import qmoe
from qmoe import MoESpec, Routing, route


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def sqrt_softplus(v):
    return math.sqrt(math.log1p(math.exp(v)))


def by_id(ids, weights):
    """Rows of (id, weight) sorted by id: top-k order among ties is not part of the contract."""
    return [sorted(zip(i, w)) for i, w in zip(ids.tolist(), weights.tolist())]


def check(ids, weights, want):
    got = by_id(ids, weights)
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in want]
    for g_row, w_row in zip(got, want):
        for (_, g), (_, w) in zip(g_row, w_row):
            assert g == pytest.approx(w, rel=1e-6, abs=1e-7)


def spec(E, k, **routing):
    return MoESpec(E, k, 32, 32, routing=Routing(**routing))


def test_softmax_renormalize():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.0, 4.0]])
    ids, w = route(spec(4, 2, mode="softmax"), logits)
    # top-2 logits, then softmax over the two: e^3 / (e^3 + e^2) = 1 / (1 + e^-1)
    check(ids, w, [[(1, 1 / (1 + math.exp(-1))), (2, 1 / (1 + math.e))],
                   [(0, 1 / (1 + math.exp(3.5))), (3, 1 / (1 + math.exp(-3.5)))]])
    assert w[0].tolist() == sorted(w[0].tolist(), reverse=True)  # best first


def test_softmax_without_renormalize_and_with_scaling():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    z = sum(math.exp(v) for v in (1.0, 3.0, 2.0, 0.0))
    ids, w = route(spec(4, 2, mode="softmax", renormalize=False), logits)
    check(ids, w, [[(1, math.exp(3) / z), (2, math.exp(2) / z)]])
    ids, w = route(spec(4, 2, mode="softmax", routed_scaling_factor=2.0), logits)
    check(ids, w, [[(1, 2 / (1 + math.exp(-1))), (2, 2 / (1 + math.e))]])


def test_sigmoid_bias_changes_selection_not_weights():
    s = spec(4, 2, mode="sigmoid_grouped", routed_scaling_factor=2.5)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids, w = route(s, logits)
    z = sig(2.0) + sig(1.0)
    check(ids, w, [[(0, 2.5 * sig(2.0) / z), (1, 2.5 * sig(1.0) / z)]])
    # the bias lifts expert 3 into the top 2; its weight is still its UNBIASED score
    ids, w = route(s, logits, torch.tensor([0.0, 0.0, 0.0, 3.0]))
    z = sig(2.0) + sig(-1.0)
    check(ids, w, [[(0, 2.5 * sig(2.0) / z), (3, 2.5 * sig(-1.0) / z)]])


def test_sigmoid_grouped_group_limit_changes_the_answer():
    # 8 experts, 4 groups of 2, keep the best 2 groups, top-2 inside them.
    # Group score = sum of its top-2 scores: g0 = sig(3) + sig(-3) = 1.0, g1 = 2 sig(2) = 1.76,
    # g2 = 2 sig(1.5) = 1.64, g3 = 2 sig(-2) = 0.24. Groups 1 and 2 win, so expert 0 (the single
    # best score, sig(3)) is out, and the top 2 come from group 1.
    logits = torch.tensor([[3.0, -3.0, 2.0, 1.9, 1.5, 1.5, -2.0, -2.0]])
    grouped = spec(8, 2, mode="sigmoid_grouped", n_group=4, topk_group=2)
    ids, w = route(grouped, logits)
    z = sig(2.0) + sig(1.9)
    check(ids, w, [[(2, sig(2.0) / z), (3, sig(1.9) / z)]])
    ids, w = route(spec(8, 2, mode="sigmoid_grouped"), logits)  # no group limit: expert 0 is chosen
    z = sig(3.0) + sig(2.0)
    check(ids, w, [[(0, sig(3.0) / z), (2, sig(2.0) / z)]])


def test_sigmoid_grouped_bias_counts_in_the_group_score():
    # a bias of +1 on experts 6 and 7 lifts group 3 above group 2 (2 sig(-2) + 2 = 2.24 > 1.76);
    # the top-2 over groups 1 and 3 by biased score are 6 and 7, weighted by their raw scores.
    logits = torch.tensor([[3.0, -3.0, 2.0, 1.9, 1.5, 1.5, -2.0, -2.5]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    ids, w = route(spec(8, 2, mode="sigmoid_grouped", n_group=4, topk_group=2, routed_scaling_factor=2.0),
                   logits, bias)
    z = sig(-2.0) + sig(-2.5)
    check(ids, w, [[(6, 2 * sig(-2.0) / z), (7, 2 * sig(-2.5) / z)]])
    # and a group holding a single excellent expert only scores by its top 2
    ids, _ = route(spec(8, 1, mode="sigmoid_grouped", n_group=4, topk_group=1), logits)
    assert ids.tolist() == [[2]]  # group 1 (1.76) beats group 0 (1.0) although sig(3) is the best score


def test_sigmoid_grouped_excluded_groups_lose_even_to_negative_biased_scores():
    # biased scores in the kept group are negative (0.5 - 1); experts of the dropped group
    # must still never be chosen (masked to -inf, not to 0)
    s = spec(4, 2, mode="sigmoid_grouped", n_group=2, topk_group=1)
    ids, w = route(s, torch.zeros(1, 4), torch.tensor([-1.0, -1.0, -2.0, -2.0]))
    check(ids, w, [[(0, 0.5), (1, 0.5)]])


def test_sqrt_softplus_with_bias_and_scaling():
    s = spec(4, 2, mode="sqrt_softplus", routed_scaling_factor=1.5)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [-3.0, 0.5, 0.2, 0.1]])
    bias = torch.tensor([1.0, 0.0, 0.0, 0.0])
    ids, w = route(s, logits, bias)
    w00, w02 = sqrt_softplus(0.0), sqrt_softplus(2.0)
    # row 1 biased: expert 0 = sqrt_softplus(-3) + 1 = 1.22 beats 0.5 (1.06) and 0.2
    w10, w11 = sqrt_softplus(-3.0), sqrt_softplus(0.5)
    check(ids, w, [[(0, 1.5 * w00 / (w00 + w02)), (2, 1.5 * w02 / (w00 + w02))],
                   [(0, 1.5 * w10 / (w10 + w11)), (1, 1.5 * w11 / (w10 + w11))]])
    ids, w = route(s, logits)  # without the bias, expert 1 wins in row 0
    w01 = sqrt_softplus(1.0)
    assert by_id(ids, w)[0][0][0] == 1
    assert by_id(ids, w)[0][0][1] == pytest.approx(1.5 * w01 / (w01 + w02), rel=1e-6)


def test_softmax_ignores_the_correction_bias():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    a = route(spec(4, 2, mode="softmax"), logits)
    b = route(spec(4, 2, mode="softmax"), logits, torch.tensor([9.0, 0.0, 0.0, 9.0]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", list(qmoe.presets))
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
def test_dtypes_and_shapes_for_every_preset(name, logit_dtype):
    s = qmoe.presets[name]
    E, k = s.num_experts, s.top_k
    logits = torch.randn(5, E, generator=torch.Generator().manual_seed(0)).to(logit_dtype)
    bias = None if s.routing.mode == "softmax" else torch.randn(E) * 0.1
    ids, w = route(s, logits, bias)
    assert ids.dtype == torch.int32 and ids.shape == (5, k)
    assert w.dtype == torch.float32 and w.shape == (5, k)
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts per token
    assert torch.allclose(w.sum(-1), torch.full((5,), s.routing.routed_scaling_factor), rtol=1e-5)
    empty_ids, empty_w = route(s, logits[:0], bias)
    assert empty_ids.shape == (0, k) and empty_ids.dtype == torch.int32
    assert empty_w.shape == (0, k) and empty_w.dtype == torch.float32


@pytest.mark.parametrize("logits,bias,match", [
    (torch.zeros(4), None, r"router_logits: expected shape \[M, 8\], got \[4\]"),
    (torch.zeros(2, 7), None, r"router_logits: expected shape \[M, 8\], got \[2, 7\]"),
    ([[0.0] * 8], None, r"router_logits: expected shape \[M, 8\], got list"),
    (torch.zeros(2, 8, dtype=torch.int64), None, r"router_logits: expected a float tensor, got torch.int64"),
    (torch.zeros(2, 8), torch.zeros(7), r"correction_bias: expected shape \[8\], got \[7\]"),
    (torch.zeros(2, 8), torch.zeros(1, 8), r"correction_bias: expected shape \[8\], got \[1, 8\]"),
    (torch.zeros(2, 8), [0.0] * 8, r"correction_bias: expected shape \[8\], got list"),
    (torch.zeros(2, 8), torch.zeros(8, dtype=torch.int32), r"correction_bias: expected a float tensor, got torch.int32"),
    (torch.zeros(2, 8), torch.zeros(8, device="meta"), r"correction_bias: expected device cpu, got meta"),
])
def test_bad_inputs(logits, bias, match):
    with pytest.raises(ValueError, match=match):
        route(spec(8, 2, mode="sigmoid_grouped", n_group=4, topk_group=2), logits, bias)


# --- ties and underflow: the same answer everywhere ------------------------------------------------
@pytest.mark.parametrize("mode", ["softmax", "sigmoid_grouped", "sqrt_softplus"])
def test_ties_go_to_the_lower_expert_id(mode):
    """Equal keys pick lower ids first, in the reference and the fused kernel alike (torch.topk
    guarantees no order for ties, so the reference sorts stably)."""
    from qmoe.kernels import routing as kr
    from qmoe.routing.reference import route as reference_route

    spec = qmoe.MoESpec(16, 4, 32, 32, routing=qmoe.Routing(mode, True))
    logits = torch.zeros(3, 16)
    logits[1, 5:9] = 1.0  # four tied winners
    logits[2, ::2] = 2.0  # eight tied winners
    ids, _ = reference_route(spec, logits)
    assert ids.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8], [0, 2, 4, 6]]
    r = spec.routing
    fused, _ = kr.fused_route(logits, 4, mode, True, 1.0, r.n_group, r.topk_group)
    assert torch.equal(fused, ids)


def test_grouped_ties_pick_lower_groups():
    from qmoe.routing.reference import route as reference_route

    spec = qmoe.MoESpec(16, 2, 32, 32, routing=qmoe.Routing("sigmoid_grouped", True, n_group=4, topk_group=2))
    ids, _ = reference_route(spec, torch.zeros(1, 16))
    assert ids.tolist() == [[0, 1]]


@pytest.mark.parametrize("mode", ["sigmoid_grouped", "sqrt_softplus"])
def test_renormalizing_scores_that_underflow_gives_zero_weights_not_nan(mode):
    from qmoe.kernels import routing as kr
    from qmoe.routing.reference import route as reference_route

    spec = qmoe.MoESpec(8, 2, 32, 32, routing=qmoe.Routing(mode, True, routed_scaling_factor=2.5))
    logits = torch.full((2, 8), -200.0)  # sigmoid and sqrt(softplus) of -200 underflow to 0 in fp32
    logits[1, :2] = 0.0  # a normal row beside it
    ids, w = reference_route(spec, logits)
    assert torch.isfinite(w).all() and w[0].tolist() == [0.0, 0.0]
    assert torch.allclose(w[1], torch.tensor([1.25, 1.25]))
    fused_ids, fused_w = kr.fused_route(logits, 2, mode, True, 2.5)
    assert torch.equal(fused_ids, ids) and torch.isfinite(fused_w).all()
    torch.testing.assert_close(fused_w, w, rtol=1e-6, atol=0)
