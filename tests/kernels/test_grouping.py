"""Token grouping on the device (kernels/moe.py: group_tokens)."""

import pytest
import torch

import qmoe.kernels.moe as km

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(ids, E, BM, g):
    flat = ids.reshape(-1).cpu()
    s = g.sorted_slots.cpu()
    be = g.block_expert.cpu()
    assert s.shape[0] == g.num_blocks * BM
    assert g.num_blocks == km.max_blocks(flat.numel(), E, BM)
    real = s[s >= 0]
    # every slot with an expert appears exactly once; slots of -1 never
    want = torch.nonzero(flat >= 0).flatten()
    assert torch.equal(torch.sort(real.long()).values, want)
    nreal = int((be >= 0).sum())
    assert be[:nreal].ge(0).all() and be[nreal:].eq(-1).all()
    assert torch.all(be[1:nreal] >= be[: nreal - 1])  # experts in order
    for b in range(g.num_blocks):
        rows = s[b * BM:(b + 1) * BM]
        if b >= nreal:
            continue
        r = rows[rows >= 0].long()
        assert r.numel() > 0, "a real block holds at least one slot"
        assert flat[r].eq(int(be[b])).all()
        # an expert's real rows come first in its blocks, padding (-1) only at its end
        if b + 1 < nreal and int(be[b + 1]) == int(be[b]):
            assert rows.ge(0).all()
    for e in range(E):
        assert int((be == e).sum()) == -(-int((flat == e).sum()) // BM)


@pytest.mark.parametrize("M,k,E,BM", [(1, 1, 4, 16), (3, 2, 8, 16), (17, 4, 8, 16), (64, 4, 8, 32),
                                      (300, 4, 8, 16), (40, 8, 130, 16)])
@pytest.mark.parametrize("small", [True, False])
def test_group_tokens(M, k, E, BM, small, monkeypatch):
    if not small:
        monkeypatch.setattr(km, "SMALL_GROUPING_MAX", 0)
    elif M * k > km.SMALL_GROUPING_MAX:
        pytest.skip("too many slots for the one-program path")
    g = torch.Generator().manual_seed(M * 31 + k)
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32).to(DEVICE)
    _check(ids, E, BM, km.group_tokens(ids, E, BM))


def test_all_dropped():
    ids = torch.full((5, 2), -1, dtype=torch.int32, device=DEVICE)
    g = km.group_tokens(ids, 4, 16)
    assert g.block_expert.cpu().eq(-1).all() and g.sorted_slots.cpu().eq(-1).all()
