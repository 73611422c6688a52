"""Expert and tensor parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs).

    import torch.distributed as dist, qmoe.parallel as qp
    dist.init_process_group("nccl")
    plan = qp.ParallelPlan(spec, weights, "auto", ep_group=dist.group.WORLD, max_tokens=256)
    _, run = plan.runner(M)
    run(x, topk_ids, topk_weights, out)        # on every rank, M = 0 included

Expert parallelism (EP): rank r of W holds experts expert_range(E, r, W) (the first E % W ranks
one more); each token travels once to every rank that owns one of its experts by
all_to_all_single, with its k slot ids (-1 for other ranks' experts), the owner computes the
plain top_k problem over its slots, and the token's rank sums the partial outputs over the
ranks in float32 (qmoe.parallel.ep).
Tensor parallelism (TP): rank r holds intermediate_range(I, format, r, W) of every expert, cut
on the format's blocks; partial outputs are all-reduced in float32, b2 added by rank 0 only
(qmoe.parallel.tp, qmoe.parallel.shard). Both together form an EP x TP grid.
`experts_batched` runs the per-expert buffers [E_local, T, H] + counts [E_local] that
low-latency all-to-all libraries deliver. docs/parallel.md has the design.
"""

from .ep import ExpertDispatch, combine
from .plan import GroupInfo, ParallelPlan, experts_batched, group_info
from .shard import (expert_range, gather_experts, gather_intermediate, intermediate_range, shard_experts,
                    shard_intermediate, shard_weights)
from .tp import all_reduce_partials

__all__ = ["ExpertDispatch", "GroupInfo", "ParallelPlan", "all_reduce_partials", "combine", "expert_range",
           "experts_batched", "gather_experts", "gather_intermediate", "group_info", "intermediate_range",
           "shard_experts", "shard_intermediate", "shard_weights"]
