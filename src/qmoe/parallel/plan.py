"""The plan of one rank of an expert- and/or tensor-parallel MoE: this rank's shard of the
weights, the local plan (qmoe.dispatch) that computes it, and the collectives around it.

    plan = ParallelPlan(spec, weights, "auto", ep_group=ep, tp_group=tp, max_tokens=256)
    backend, run = plan.runner(M)         # as qmoe.dispatch.Plan.runner
    run(x, topk_ids, topk_weights, out)   # every rank of the groups calls it, M = 0 included

It stands where qmoe.MoE keeps its qmoe.dispatch.Plan: same runner / backend_for / explain.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from ..backends import get_backend
from ..dispatch import Plan, make_plan
from ..spec import MoESpec, Routing
from ..weights import ExpertWeights
from .ep import ExpertDispatch
from .shard import expert_range, intermediate_range, shard_experts, shard_intermediate
from .tp import all_reduce_partials

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """A torch.distributed group as this process sees it: the group, its rank in it, its size."""

    group: object
    rank: int
    size: int


def group_info(name: str, group, device: torch.device) -> GroupInfo:
    """The GroupInfo of a ProcessGroup given as argument `name`; ValueError naming it otherwise."""
    if not dist.is_available():
        raise ValueError(f"{name}: torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialized (call "
                         f"torch.distributed.init_process_group first)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{name}: this process is not a member of the group (torch.distributed.new_group "
                         f"returned NON_GROUP_MEMBER here)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"{name}: expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")
    kind = str(dist.get_backend(group))
    if "nccl" in kind and device.type != "cuda":
        raise ValueError(f"{name}: an NCCL group needs the weights on a CUDA device, got {device}")
    return GroupInfo(group, rank, dist.get_world_size(group))


class ParallelPlan:
    """One rank's part of a MoE layer split over ranks.

    spec: the whole layer's MoESpec (global E, I, top_k); weights: the whole layer's canonical
      ExpertWeights (this rank's shard is cut from them: experts as views, the intermediate
      slice as a copy) or this rank's shard already (`qmoe.parallel.shard_weights`, or a
      loader's), told apart by their shapes; on a tensor-parallel rank other than 0, b2 is
      replaced by zeros either way (it is added once, by rank 0);
    backend: "auto" or a backend name, for the local experts (qmoe.dispatch.make_plan on the
      shard, with the local spec: E = this rank's experts, I = its slice, default routing under
      EP: a row is a token with its k slots, those of other ranks' experts -1);
    ep_group: a torch.distributed ProcessGroup over which experts are split (None: every rank
      holds every expert); rank r holds qmoe.parallel.expert_range(E, r, W);
    tp_group: a ProcessGroup over which the intermediate dimension is split (None: no split);
      its ranks must be called with the same tokens; rank r holds
      qmoe.parallel.intermediate_range(I, format, r, W);
    max_tokens: None (EP sends exactly the routed rows after exchanging counts on the host: one
      host sync per call, not capturable) or the most tokens any rank of the EP group passes in
      one call (fixed buffers, no host sync: CUDA-graph capturable with a capturable backend);
      EP only;
    max_layout_bytes: as qmoe.MoE, for the local plan.

    With both groups the ranks form an EP x TP grid: the members of an EP group share one
    TP rank index, the members of a TP group hold the same experts.
    """

    poisons_bad_ids = True
    """(As a backend stand-in, for an EP plan:) a token with an id outside [-1, E) gets a NaN row
    from the combine, with no host sync; nothing is read or written out of bounds."""
    name = "parallel"

    def __init__(self, spec: MoESpec, weights: ExpertWeights, backend: str = "auto", *, ep_group=None,
                 tp_group=None, max_tokens: int | None = None, max_layout_bytes: int | None = None):
        if not isinstance(spec, MoESpec):
            raise ValueError(f"spec: expected a MoESpec, got {type(spec).__name__}")
        if not isinstance(weights, ExpertWeights):
            raise ValueError(f"weights: expected an ExpertWeights, got {type(weights).__name__}")
        if ep_group is None and tp_group is None:
            raise ValueError("ep_group, tp_group: expected at least one torch.distributed group, got None for both")
        _check_max_tokens(max_tokens, ep_group is not None)
        device = weights.device
        self.spec, self.max_tokens = spec, max_tokens
        self.ep = None if ep_group is None else group_info("ep_group", ep_group, device)
        self.tp = None if tp_group is None else group_info("tp_group", tp_group, device)
        E, I = spec.num_experts, spec.intermediate_size
        ep_rank, ep_size = (0, 1) if self.ep is None else (self.ep.rank, self.ep.size)
        tp_rank, tp_size = (0, 1) if self.tp is None else (self.tp.rank, self.tp.size)
        if E < ep_size:
            raise ValueError(f"ep_group: {ep_size} ranks for {E} experts; expected at most one rank per expert")
        self.experts = expert_range(E, ep_rank, ep_size)            # (first, count)
        self.intermediate = intermediate_range(I, weights.format, tp_rank, tp_size)  # (lo, hi)
        self.weights = self._shard(spec, weights, ep_rank, ep_size, tp_rank, tp_size)
        count, (lo, hi) = self.experts[1], self.intermediate
        changes = {"num_experts": count, "intermediate_size": hi - lo}
        if self.ep is not None:  # routing happened before the dispatch
            changes.update(routing=Routing())
        self.local_spec = dataclasses.replace(spec, **changes)
        self.local: Plan = make_plan(self.local_spec, self.weights, backend, max_layout_bytes=max_layout_bytes)
        self.dispatch = None
        if self.ep is not None:
            self.dispatch = ExpertDispatch(self.ep.group, ep_rank, ep_size, E, spec.top_k, spec.hidden_size,
                                           device, max_tokens)
        self._runners = {}

    def with_max_tokens(self, max_tokens: int | None) -> "ParallelPlan":
        """This plan with the other EP transport or other fixed buffers (a plan per captured
        batch size, say: every call moves max_tokens rows per rank pair), sharing this
        plan's shard and local layouts (nothing is prepared again)."""
        _check_max_tokens(max_tokens, self.ep is not None)
        other = copy.copy(self)
        other.max_tokens, other._runners = max_tokens, {}
        d = self.dispatch
        if d is not None:
            other.dispatch = ExpertDispatch(d.group, d.rank, d.size, d.num_experts, d.top_k, d.hidden_size,
                                            d.device, max_tokens)
        return other

    @staticmethod
    def _shard(spec, weights, ep_rank, ep_size, tp_rank, tp_size):
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
        count = expert_range(E, ep_rank, ep_size)[1]
        lo, hi = intermediate_range(I, weights.format, tp_rank, tp_size)
        if weights.hidden_size != H or weights.num_experts not in (E, count) or \
                weights.intermediate_size not in (I, hi - lo):
            raise ValueError(f"weights: expected (num_experts, hidden_size, intermediate_size) = {(E, H, I)} "
                             f"(the whole layer) or {(count, H, hi - lo)} (this rank's shard), got "
                             f"{(weights.num_experts, weights.hidden_size, weights.intermediate_size)}")
        if spec.bias != weights.has_bias:
            raise ValueError(f"weights: spec {spec.name or ''} says bias={spec.bias}, but the weights "
                             f"{'have' if weights.has_bias else 'have no'} biases")
        if weights.num_experts == E:
            weights = shard_experts(weights, ep_rank, ep_size)
        if weights.intermediate_size == I:
            weights = shard_intermediate(weights, tp_rank, tp_size)
        elif tp_rank != 0 and weights.b2 is not None:  # a given shard: b2 is rank 0's to add
            weights = ExpertWeights(weights.w13, weights.w2, weights.b13, torch.zeros_like(weights.b2))
        return weights

    # --- the Plan interface ----------------------------------------------------------------
    @property
    def prepared(self) -> dict:
        """The local plan's prepared layouts (backend name -> Prepared)."""
        return self.local.prepared

    @property
    def capturable(self) -> bool:
        """Whether a call can be captured in a CUDA graph: EP with max_tokens (or no EP), and
        every local layout's backend capturable."""
        if self.ep is not None and self.max_tokens is None:
            return False
        return all(get_backend(n).capturable for n in self.local.prepared)

    def local_tokens(self, num_tokens: int) -> int:
        """Rows the local experts compute in a call of num_tokens tokens: W x max_tokens with
        fixed buffers (num_tokens in a group of one); with counts exchanged, num_tokens if the
        peers send as many as this rank (it varies with the routing); num_tokens without EP."""
        if self.ep is None or self.ep.size == 1:
            return num_tokens
        if self.max_tokens is not None:
            return self.ep.size * self.max_tokens
        return num_tokens

    def backend_for(self, num_tokens: int) -> str:
        """The backend that computes the local experts in a call of num_tokens tokens."""
        return self.local.backend_for(self.local_tokens(num_tokens))

    def runner(self, num_tokens: int):
        """(backend, run) for num_tokens tokens, as qmoe.dispatch.Plan.runner:
        run(x, topk_ids, topk_weights, out, shared_output=None) -> out.

        x: [M, H] contiguous; topk_ids: [M, k] int32 contiguous, global ids; topk_weights:
        [M, k] fp32 contiguous; out: [M, H] of x's dtype. Every rank of the groups must call
        it, M = 0 included. backend is the local backend without EP, else this plan (its
        poisons_bad_ids: the combine turns rows with bad ids NaN)."""
        hit = self._runners.get(num_tokens)
        if hit is None:
            if self.max_tokens is not None and num_tokens > self.max_tokens:
                raise ValueError(f"x: expected at most max_tokens = {self.max_tokens} tokens (the size of the "
                                 f"expert-parallel buffers), got {num_tokens}")
            if self.dispatch is None:
                backend, local_run = self.local.runner(num_tokens)
                hit = (backend, self._tp_only(local_run))
            else:
                hit = (self, self._expert_parallel)
            self._runners[num_tokens] = hit
        return hit

    def _shared(self, shared_output):
        return shared_output if self.tp is None or self.tp.rank == 0 else None

    def _reduce(self, out):
        if self.tp is not None and self.tp.size > 1 and out.numel():
            all_reduce_partials(out, self.tp.group)
        return out

    def _tp_only(self, local_run):
        def run(x, topk_ids, topk_weights, out, shared_output=None):
            if x.shape[0]:
                local_run(x, topk_ids, topk_weights, out, self._shared(shared_output))
            return self._reduce(out)

        return run

    def _expert_parallel(self, x, topk_ids, topk_weights, out, shared_output=None):
        self.dispatch.run(self.local, x, topk_ids, topk_weights, out, self._shared(shared_output))
        return self._reduce(out)

    def explain(self, num_tokens: int) -> str:
        """Which ranks hold what, how rows travel, and the local plan's explanation."""
        lines = []
        if self.ep is not None:
            first, count = self.experts
            if self.ep.size == 1:
                how = ("a group of one: no exchange, x and the ids go to the local experts as they are"
                       if self.max_tokens is not None else "a group of one: counts on the host, no exchange")
            elif self.max_tokens is not None:
                how = f"fixed buffers of max_tokens = {self.max_tokens} rows per rank pair, no host sync"
            else:
                how = "counts exchanged on the host, then the rows needed"
            lines.append(f"expert parallel over {self.ep.size} ranks: rank {self.ep.rank} holds experts "
                         f"{first}-{first + count - 1} of {self.spec.num_experts}; each token goes once to "
                         f"each rank owning one of its experts by all_to_all_single ({how}); the partial "
                         f"outputs are summed on the token's rank")
        if self.tp is not None:
            lo, hi = self.intermediate
            lines.append(f"tensor parallel over {self.tp.size} ranks: rank {self.tp.rank} holds I {lo}-{hi - 1} "
                         f"of {self.spec.intermediate_size}; partial outputs all-reduced in float32")
        m = self.local_tokens(num_tokens)
        head = f"M={num_tokens}: " + lines[0]
        local = self.local.explain(m).replace("\n", "\n  ")
        return "\n".join([head] + [f"  {ln}" for ln in lines[1:]] + [f"  local experts, {m} rows: {local}"])


def _check_max_tokens(max_tokens, ep: bool):
    if max_tokens is None:
        return
    if not ep:
        raise ValueError(f"max_tokens: sizes the expert-parallel buffers; expected None without ep_group, "
                         f"got {max_tokens!r}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected None or a positive int, got {max_tokens!r}")


def experts_batched(plan, x: torch.Tensor, counts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The local experts on the batched activation format that low-latency all-to-all libraries
    produce (DeepEP's low-latency mode, say): expert e's rows are x[e, :counts[e]].

    plan: a qmoe.dispatch.Plan (a MoE's plan: E_local = its num_experts) or a ParallelPlan (this
      rank's experts; with TP, the partial outputs are all-reduced over tp_group, whose ranks
      must pass the same buffers);
    x: [E_local, T, H] bf16 (fp16, fp32 accepted), contiguous; T: the buffers' rows per expert;
    counts: [E_local] int32 or int64 on x's device: rows in use per expert (no host check:
      values below 0 act as 0, above T as T);
    out: [E_local, T, H] of x's dtype, contiguous, or None.
    Returns out: each row in use is that row's output through its expert, weight 1 (the library
    applies the routing weights when it combines); rows past an expert's count are 0. Computed
    by the backend's forward_batched (qmoe.backends.base.Backend.forward_batched).
    """
    local = plan.local if isinstance(plan, ParallelPlan) else plan
    if not isinstance(local, Plan):
        raise ValueError(f"plan: expected a qmoe.dispatch.Plan or a ParallelPlan, got {type(plan).__name__}")
    any_prepared = next(iter(local.prepared.values()))
    spec, device = any_prepared.spec, any_prepared.device
    E, H = spec.num_experts, spec.hidden_size
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != E or x.shape[2] != H:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected shape [{E}, T, {H}] (local experts, rows per expert, hidden), got {got}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x: expected dtype bfloat16, float16 or float32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"x: expected device {device} (where the weights are), got {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous tensor, got strides {list(x.stride())}")
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (E,) or \
            counts.dtype not in (torch.int32, torch.int64):
        got = f"{counts.dtype} {list(counts.shape)}" if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"counts: expected int32 or int64 of shape [{E}], got {got}")
    if counts.device != device:
        raise ValueError(f"counts: expected device {device}, got {counts.device}")
    T = x.shape[1]
    if out is None:
        out = torch.empty_like(x)
    elif not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or \
            out.device != device or not out.is_contiguous():
        got = (f"{out.dtype} {list(out.shape)} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous")
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {list(x.shape)} on {device}, got {got}")
    if E * T:
        name = local.backend_for(E * T)
        get_backend(name).forward_batched(local.prepared[name], x, counts, out)
    if isinstance(plan, ParallelPlan):
        plan._reduce(out)
    return out


__all__ = ["GroupInfo", "ParallelPlan", "experts_batched", "group_info"]
