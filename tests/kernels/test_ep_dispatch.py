"""The expert-parallel send rows (kernels/ep_dispatch.py): the Triton launch equals its PyTorch
twin, which is checked against the rule itself."""

import pytest
import torch

from qmoe.kernels.ep_dispatch import fill_send_rows, fill_send_rows_torch
from qmoe.parallel.ep import ExpertDispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(W, T, M, k, H, E, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    route = ExpertDispatch(None, 0, W, E, k, H, DEVICE)._route
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32)
    if M:
        ids[0, 0], ids[-1, -1] = E + 3, -5          # outside [-1, E): rank 0's bad id
    x = torch.randn(M, H, generator=g).to(dtype)
    w = torch.rand(M, k, generator=g)
    stale = (torch.randn(W * T, H, generator=g).to(dtype), torch.randint(0, 3, (W * T, k), generator=g,
             dtype=torch.int32), torch.rand(W * T, k, generator=g))
    return [t.to(DEVICE) for t in (route, x, ids, w)], [t.to(DEVICE) for t in stale]


@pytest.mark.parametrize("W,T,M,k,H,E,dtype", [(1, 4, 3, 2, 40, 8, torch.bfloat16),
                                               (3, 5, 4, 3, 40, 10, torch.float32),
                                               (2, 3, 0, 4, 16, 8, torch.bfloat16),
                                               (4, 2, 2, 1, 1100, 8, torch.float16)])
def test_kernel_equals_torch_and_the_rule(W, T, M, k, H, E, dtype):
    (route, x, ids, w), stale = _inputs(W, T, M, k, H, E, seed=W * 100 + M, dtype=dtype)
    outs = []
    for fill in (fill_send_rows, fill_send_rows_torch):
        sx, sids, sw = (t.clone() for t in stale)
        fill(route, x, ids, w, sx, sids, sw)
        outs.append((sx, sids, sw))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    sx, sids, sw = (t.view(W, T, -1).cpu() for t in outs[0])
    ids_c, x_c, w_c = ids.cpu(), x.cpu(), w.cpu()
    owner = torch.repeat_interleave(torch.arange(W), torch.tensor(
        [E // W + (r < E % W) for r in range(W)]))
    for r in range(W):
        first = int((owner < r).sum())
        for t in range(M):
            for j in range(k):
                e = int(ids_c[t, j])
                want = -1 if e == -1 else (e - first if 0 <= e < E and owner[e] == r else -1)
                if not -1 <= e < E and r == 0:
                    want = int((owner == 0).sum())      # an id rank 0 does not have: it poisons the row
                assert int(sids[r, t, j]) == want, (r, t, j, e)
            assert torch.equal(sx[r, t], x_c[t]) and torch.equal(sw[r, t], w_c[t])
    assert sids[:, M:].eq(-1).all(), "rows past M carry ids -1 only"
    stale_x = stale[0].view(W, T, -1).cpu()
    assert torch.equal(sx[:, M:], stale_x[:, M:]), "rows past M keep their x"



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_send_rows_and_combine_replay_in_a_cuda_graph():
    """The W > 1 fixed transport's own steps (send rows, combine) captured once and replayed with
    new tokens: the same result as the PyTorch twin every time (the collective between them is
    the multi-GPU issue's)."""
    from qmoe.parallel.ep import combine
    from qmoe.timing import capture_graph

    W, T, M, k, H, E = 4, 8, 8, 4, 256, 16
    (route, x, ids, w), (sx, sids, sw) = _inputs(W, T, M, k, H, E, seed=5)
    out = torch.empty_like(x)

    def step():
        fill_send_rows(route, x, ids, w, sx, sids, sw)
        combine(sx.view(W, T, H)[:, :M], out)

    graph = capture_graph(step)
    for seed in (11, 12):
        (_, x2, ids2, w2), _ = _inputs(W, T, M, k, H, E, seed=seed)
        for static, new in ((x, x2), (ids, ids2), (w, w2)):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        tx, tids, tw = (t.clone() for t in (sx, sids, sw))
        fill_send_rows_torch(route, x, ids, w, tx, tids, tw)
        assert torch.equal(sx, tx) and torch.equal(sids, tids) and torch.equal(sw, tw)
        assert torch.equal(out, combine(tx.view(W, T, H)[:, :M], torch.empty_like(out)))
        assert torch.equal(out[0], x[0] * W), "every chunk holds the token: the sum over W ranks"
