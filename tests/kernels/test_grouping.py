"""Token grouping on the device (kernels/moe.py: group_tokens)."""

import pytest
import torch

import qmoe.kernels.moe as km

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(ids, E, BM, g, TM=0):
    flat = ids.reshape(-1).cpu()
    assert g.num_blocks == km.max_blocks(flat.numel(), E, BM)
    assert g.num_tail_blocks == (min(E, flat.numel()) if TM else 0)
    assert g.sorted_slots.shape[0] == g.num_blocks * BM + g.num_tail_blocks * TM
    real = g.sorted_slots.cpu()
    real = real[real >= 0]
    # every slot with an expert appears exactly once; slots of -1 never
    want = torch.nonzero(flat >= 0).flatten()
    assert torch.equal(torch.sort(real.long()).values, want)
    counts = [int((flat == e).sum()) for e in range(E)]
    tails = [bool(TM) and 1 <= c % BM <= TM for c in counts]
    parts = g.parts()
    assert len(parts) == (2 if TM else 1)
    bm, s, be, nb = parts[0]
    assert bm == BM and nb == g.num_blocks
    full = [-(-(c - (c % BM if t else 0)) // BM) for c, t in zip(counts, tails)]
    _check_part(flat, E, BM, s.cpu(), be.cpu(), nb, full)
    if TM:
        bm, s, be, nb = parts[1]
        assert bm == TM and nb == g.num_tail_blocks
        _check_part(flat, E, TM, s.cpu(), be.cpu(), nb, [int(t) for t in tails])
        s, be = s.cpu(), be.cpu()
        for b in range(int((be >= 0).sum())):   # a tail block holds its expert's last count % BM slots
            assert int((s[b * TM:(b + 1) * TM] >= 0).sum()) == counts[int(be[b])] % BM


def _check_part(flat, E, BM, s, be, nblocks, want_blocks):
    """One part of a grouping: blocks of BM rows, experts in order; want_blocks[e]: expert e's blocks."""
    assert s.shape[0] == nblocks * BM and be.shape[0] == nblocks
    nreal = int((be >= 0).sum())
    assert be[:nreal].ge(0).all() and be[nreal:].eq(-1).all()
    assert torch.all(be[1:nreal] >= be[:max(nreal - 1, 0)])  # experts in order
    for b in range(nblocks):
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
        assert int((be == e).sum()) == want_blocks[e]


@pytest.mark.parametrize("M,k,E,BM", [(1, 1, 4, 16), (3, 2, 8, 16), (17, 4, 8, 16), (64, 4, 8, 32),
                                      (300, 4, 8, 16), (40, 8, 130, 16)])
@pytest.mark.parametrize("small", [True, False])
def test_group_tokens(M, k, E, BM, small, monkeypatch):
    ids = _random_ids(M, k, E, M * 31 + k, small, monkeypatch)
    _check(ids, E, BM, km.group_tokens(ids, E, BM))


def _random_ids(M, k, E, seed, small, monkeypatch):
    """[M, k] int32 ids in [-1, E) on DEVICE; small=False makes the grouping take its three-kernel
    path (a case too large for the one-program path is skipped when small)."""
    if not small:
        monkeypatch.setattr(km, "SMALL_GROUPING_MAX", 0)
    elif M * k > km.SMALL_GROUPING_MAX:
        pytest.skip("too many slots for the one-program path")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32).to(DEVICE)


@pytest.mark.parametrize("M,k,E,BM,TM", [(150, 2, 8, 32, 16), (300, 4, 8, 64, 32), (40, 8, 130, 32, 16),
                                         (700, 4, 16, 128, 64), (40, 4, 130, 32, 16), (5, 2, 300, 32, 16),
                                         (70, 3, 12, 32, 16)])
@pytest.mark.parametrize("small", [True, False])
def test_group_tokens_with_tail_blocks(M, k, E, BM, TM, small, monkeypatch):
    ids = _random_ids(M, k, E, M * 7 + BM, small, monkeypatch)
    grp = km.group_tokens(ids, E, BM, tail_m=TM)
    _check(ids, E, BM, grp, TM)
    flat = ids.reshape(-1).cpu()
    assert any(1 <= int((flat == e).sum()) % BM <= TM for e in range(E)), "the case meets no tail block"


@pytest.mark.parametrize("small", [True, False])
def test_tail_block_boundaries(small, monkeypatch):
    """Counts 16, 17, 32, 48, 1, 0 and 49 with 32-row blocks and 16-row tails: a tail block for
    16, 48 (one full block + 16) and 1; a full block (17 > 16 rows) for 17, two for 49 (32 + 17);
    one full block and no tail for 32; nothing for 0."""
    if not small:
        monkeypatch.setattr(km, "SMALL_GROUPING_MAX", 0)
    counts = [16, 17, 32, 48, 1, 0, 49]
    flat = torch.cat([torch.full((c,), e, dtype=torch.int32) for e, c in enumerate(counts)])
    ids = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))].reshape(-1, 1)
    if small and ids.numel() > km.SMALL_GROUPING_MAX:
        pytest.skip("too many slots for the one-program path")
    grp = km.group_tokens(ids.to(DEVICE), len(counts), 32, tail_m=16)
    _check(ids, len(counts), 32, grp, 16)
    (_, _, be, _), (_, _, tbe, _) = grp.parts()
    assert [int((be.cpu() == e).sum()) for e in range(len(counts))] == [0, 1, 1, 1, 0, 0, 2]
    assert tbe.cpu()[:3].tolist() == [0, 3, 4] and tbe.cpu()[3:].eq(-1).all()


@pytest.mark.parametrize("TM", [8, 24, 32])
def test_bad_tail_m(TM):
    ids = torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="tail_m"):
        km.group_tokens(ids, 4, 32, tail_m=TM)


def test_all_dropped():
    ids = torch.full((5, 2), -1, dtype=torch.int32, device=DEVICE)
    g = km.group_tokens(ids, 4, 16)
    assert g.block_expert.cpu().eq(-1).all() and g.sorted_slots.cpu().eq(-1).all()


@pytest.mark.parametrize("small", [True, False])
def test_one_expert_with_many_blocks(small, monkeypatch):
    """Skewed routing: 200 of 240 slots on expert 5 (13 blocks of 16 rows), the rest spread over 20
    experts: each expert writes its id into every one of its blocks, the rest of the blocks -1."""
    if not small:
        monkeypatch.setattr(km, "SMALL_GROUPING_MAX", 0)
    g = torch.Generator().manual_seed(9)
    flat = torch.cat([torch.full((200,), 5, dtype=torch.int32), torch.randint(-1, 20, (40,), generator=g,
                                                                              dtype=torch.int32)])
    ids = flat[torch.randperm(240, generator=g)].reshape(120, 2).to(DEVICE)
    grp = km.group_tokens(ids, 20, 16)
    _check(ids, 20, 16, grp)
    assert int((grp.block_expert.cpu() == 5).sum()) >= 13
