"""Tensor parallelism: the partial outputs of the ranks' intermediate slices, summed.

Every rank of a tensor-parallel group holds the same tokens (x, topk_ids, topk_weights are the
same on all of them, as for any tensor-parallel layer) and computes the whole layer on its slice
of I (qmoe.parallel.shard.shard_intermediate): a partial output in x's dtype, with b2 and the
shared output added on rank 0 only. The partials are summed in float32 by one all-reduce and
rounded once to x's dtype, so every rank ends with the same full output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_partials(out: torch.Tensor, group) -> torch.Tensor:
    """out: [..., H] this rank's partial output, replaced by the sum over `group` (float32 sum,
    rounded once to out's dtype). Fixed size, no host sync: capturable."""
    if out.dtype == torch.float32:
        dist.all_reduce(out, group=group)
        return out
    acc = out.float()
    dist.all_reduce(acc, group=group)
    out.copy_(acc)
    return out


__all__ = ["all_reduce_partials"]
