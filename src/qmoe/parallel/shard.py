"""How experts and the intermediate dimension are split over ranks, and the weight shard each
rank holds (every cut next to its inverse).

Expert parallelism over W ranks: rank r holds a contiguous range of experts. With
E = q * W + m, the first m ranks hold q + 1 experts and the others q (E = 10 over 4 ranks:
3, 3, 2, 2; experts 0-2, 3-5, 6-7, 8-9).

Tensor parallelism over W ranks: rank r holds the slice [lo, hi) of the intermediate dimension
of every expert. w2 is quantized along I, so the slice is cut on the format's block boundaries
(qmoe.formats.block_size): the I / block blocks are split as the experts are (the first ranks
one block more; I = 2880 in mxfp4 blocks of 32 over 4 ranks: 736, 736, 704, 704). On each rank
w13 keeps rows [gate[lo:hi]; up[lo:hi]] (still gate then up), w2 the columns lo:hi, b13 the
same rows; the nvfp4 global scale of each matrix is unchanged (a slice dequantizes to the same
values). b2 is kept on rank 0 only and is zero on the others, so the partial outputs summed over
the ranks add it once. SwiGLU is elementwise over I, so the slices compute the full layer exactly.
"""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, block_size
from ..weights import ExpertWeights


def _check_rank(rank, world_size):
    for name, v in (("world_size", world_size), ("rank", rank)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name}: expected an int, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size} (world_size >= 1), got {rank}")


def _split(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of rank's part of n items split into contiguous parts, the first n % W one larger."""
    q, m = divmod(n, world_size)
    return rank * q + min(rank, m), q + (rank < m)


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first expert, number of experts) that `rank` of `world_size` expert-parallel ranks holds."""
    _check_rank(rank, world_size)
    if not isinstance(num_experts, int) or num_experts < world_size:
        raise ValueError(f"num_experts: expected at least one expert per rank ({world_size} ranks), "
                         f"got {num_experts!r}")
    return _split(num_experts, rank, world_size)


def intermediate_range(intermediate_size: int, fmt: str, rank: int, world_size: int) -> tuple[int, int]:
    """(lo, hi): the slice of the intermediate dimension that `rank` of `world_size`
    tensor-parallel ranks holds, on `fmt`'s block boundaries."""
    _check_rank(rank, world_size)
    block = block_size(fmt)
    if not isinstance(intermediate_size, int) or intermediate_size % block:
        raise ValueError(f"intermediate_size: expected a multiple of the {fmt} block ({block}), "
                         f"got {intermediate_size!r}")
    blocks = intermediate_size // block
    if blocks < world_size:
        raise ValueError(f"intermediate_size: {intermediate_size} is {blocks} {fmt} block(s) of {block}; "
                         f"{world_size} tensor-parallel ranks need at least one block each")
    start, count = _split(blocks, rank, world_size)
    return start * block, (start + count) * block


# --- expert parallelism: a range of experts ------------------------------------------------------

def shard_experts(weights: ExpertWeights, rank: int, world_size: int) -> ExpertWeights:
    """The experts `rank` holds (expert_range), as views of `weights` (nothing is copied;
    `.to(device)` of the shard copies only its experts). A world of one returns `weights` itself.
    Inverse: `gather_experts`."""
    first, count = expert_range(weights.num_experts, rank, world_size)
    if count == weights.num_experts:
        return weights
    cut = slice(first, first + count)
    return ExpertWeights(weights.w13[cut], weights.w2[cut],
                         None if weights.b13 is None else weights.b13[cut],
                         None if weights.b2 is None else weights.b2[cut])


def gather_experts(shards) -> ExpertWeights:
    """Inverse of `shard_experts`: the shards of ranks 0..W-1 (in rank order) concatenated."""
    shards = list(shards)
    if not shards or not all(isinstance(s, ExpertWeights) for s in shards):
        raise ValueError("shards: expected a non-empty sequence of ExpertWeights in rank order")

    def cat(get):
        parts = [get(s) for s in shards]
        return None if parts[0] is None else torch.cat(parts)

    def cat_q(name):
        qs = [getattr(s, name) for s in shards]
        return QuantizedTensor(qs[0].format, (sum(q.shape[0] for q in qs), *qs[0].shape[1:]),
                               cat(lambda s: getattr(s, name).data), cat(lambda s: getattr(s, name).scales),
                               cat(lambda s: getattr(s, name).global_scale))

    return ExpertWeights(cat_q("w13"), cat_q("w2"), cat(lambda s: s.b13), cat(lambda s: s.b2))


# --- tensor parallelism: a slice of the intermediate dimension -----------------------------------

def _packed(q: QuantizedTensor) -> int:
    """Logical elements per stored element of q.data along K (2 for the 4-bit formats)."""
    return 1 if q.format == "bf16" else 2


def _rows(q: QuantizedTensor, parts) -> QuantizedTensor:
    """q [E, N, K] with only the rows of the (lo, hi) ranges in `parts`, concatenated."""
    def cut(t):
        return None if t is None else torch.cat([t[:, lo:hi] for lo, hi in parts], dim=1)

    n = sum(hi - lo for lo, hi in parts)
    return QuantizedTensor(q.format, (q.shape[0], n, q.shape[2]), cut(q.data), cut(q.scales), q.global_scale)


def _columns(q: QuantizedTensor, lo: int, hi: int) -> QuantizedTensor:
    """q [E, N, K] with only the columns lo:hi (on block boundaries) of K."""
    block, p = block_size(q.format), _packed(q)
    data = q.data[:, :, lo // p: hi // p].contiguous()
    scales = None if q.scales is None else q.scales[:, :, lo // block: hi // block].contiguous()
    return QuantizedTensor(q.format, (q.shape[0], q.shape[1], hi - lo), data, scales, q.global_scale)


def shard_intermediate(weights: ExpertWeights, rank: int, world_size: int) -> ExpertWeights:
    """The slice of every expert's intermediate dimension `rank` holds (intermediate_range),
    copied: w13 [E, 2 I_r, H] rows [gate[lo:hi]; up[lo:hi]], w2 [E, H, I_r], b13 [E, 2 I_r],
    b2 [E, H] on rank 0 and zeros on the others (added once over the ranks). A world of one
    returns `weights` itself. Inverse: `gather_intermediate`."""
    I = weights.intermediate_size
    lo, hi = intermediate_range(I, weights.format, rank, world_size)
    if (lo, hi) == (0, I):
        return weights
    parts = ((lo, hi), (I + lo, I + hi))
    b13 = None if weights.b13 is None else torch.cat([weights.b13[:, a:b] for a, b in parts], dim=1)
    b2 = weights.b2
    if b2 is not None and rank != 0:
        b2 = torch.zeros_like(b2)
    return ExpertWeights(_rows(weights.w13, parts), _columns(weights.w2, lo, hi), b13, b2)


def gather_intermediate(shards) -> ExpertWeights:
    """Inverse of `shard_intermediate`: the slices of ranks 0..W-1 (in rank order) joined; b2 is
    rank 0's."""
    shards = list(shards)
    if not shards or not all(isinstance(s, ExpertWeights) for s in shards):
        raise ValueError("shards: expected a non-empty sequence of ExpertWeights in rank order")
    if len(shards) == 1:
        return shards[0]
    first = shards[0]

    def gate_up(t, dim):  # t [E, 2 I_r, ...]: all gate halves, then all up halves
        halves = [x.chunk(2, dim=1) for x in t]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)

    w13s, w2s = [s.w13 for s in shards], [s.w2 for s in shards]
    E, H = first.num_experts, first.hidden_size
    I = sum(s.intermediate_size for s in shards)
    opt = (lambda ts: None if ts[0] is None else gate_up(ts, 1))
    w13 = QuantizedTensor(first.format, (E, 2 * I, H), gate_up([q.data for q in w13s], 1),
                          opt([q.scales for q in w13s]), first.w13.global_scale)
    w2 = QuantizedTensor(first.format, (E, H, I), torch.cat([q.data for q in w2s], dim=2),
                         None if first.w2.scales is None else torch.cat([q.scales for q in w2s], dim=2),
                         first.w2.global_scale)
    return ExpertWeights(w13, w2, opt([s.b13 for s in shards]), first.b2)


def shard_weights(weights: ExpertWeights, *, ep_rank: int = 0, ep_size: int = 1, tp_rank: int = 0,
                  tp_size: int = 1) -> ExpertWeights:
    """This rank's shard: its experts (shard_experts), then its intermediate slice
    (shard_intermediate). With ep_size = tp_size = 1 it is `weights` itself."""
    return shard_intermediate(shard_experts(weights, ep_rank, ep_size), tp_rank, tp_size)


__all__ = ["expert_range", "gather_experts", "gather_intermediate", "intermediate_range", "shard_experts",
           "shard_intermediate", "shard_weights"]
