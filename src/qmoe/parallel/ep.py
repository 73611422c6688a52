"""Expert parallelism: each token goes once to every rank that owns one of its experts, is
computed there by that rank's backend over the slots it owns, and the ranks' partial outputs
come back to the token's rank and are summed there.

Per call, on every rank of the group (a rank with no tokens still takes part: it computes the
rows the others send):
1. dispatch: token t becomes one row per rank r that owns at least one of its k experts: x[t],
   and for each slot j the local id of its expert at r (e - first(r)), or -1 where the expert
   lives elsewhere, with the slot's weight; sent to r by all_to_all_single. ids of -1 are not
   sent. An id outside [-1, E) goes to rank 0 as an id rank 0 does not have (its local expert
   count), so rank 0 computes a NaN row for the token: the facade's contract for bad ids;
2. compute: the owner runs its local plan on the rows it received: a top_k = k problem whose
   slots of other ranks are -1, so each output row is the weighted sum over the token's slots
   at that rank, in x's dtype (the same problem plain qmoe.MoE computes, on fewer experts);
3. combine: the rows go back the same way, and the token's rank sums its partial rows over the
   ranks in float32 (rank order, one reduction whose order depends on the shapes only), adds
   shared_output, and rounds once to x's dtype.

Two transports, the same rows:
- counts exchanged on the host (max_tokens None): the send counts go first (an all_to_all of
  W integers, one host synchronization), then exactly the rows needed. Any M; not capturable.
- fixed buffers (max_tokens given, T = max_tokens): rank pair (source, destination) has T rows,
  token t of the source at row t of its chunk; rows not used carry ids -1 only (they compute to
  zero). Equal splits, no counts, no host sync, buffers allocated once per dtype, the send rows
  written by one Triton launch on GPUs (qmoe.kernels.ep_dispatch): CUDA-graph capturable (with a
  capturable backend). Each call moves W x T rows each way whatever the routing.

A group of one exchanges nothing and has one partial to sum, and its route is the identity on
ids (every expert keeps its number, -1 stays -1, an id outside [-1, E) stays outside and is
poisoned by the local plan): with fixed buffers its one chunk is the tokens themselves, so the
local plan computes x with the given ids straight into out. That adds no launch to plain
qmoe.MoE with its default check_ids=True (a backend that does not poison bad ids itself gets the
same run_poisoning steps there); the counted transport runs its PyTorch steps as for W ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..dispatch import run_poisoning
from .shard import expert_range


class ExpertDispatch:
    """The dispatch / combine of one rank of an expert-parallel group.

    group: the torch.distributed group (None for a group of one without a process group);
    rank, size: this process's rank in it and its size W; num_experts, top_k, hidden_size: the
    global layer's E, k, H; device: where the tables and buffers live; max_tokens: None (counts
    exchanged on the host) or the most tokens any rank passes in one call (fixed buffers).
    """

    def __init__(self, group, rank: int, size: int, num_experts: int, top_k: int, hidden_size: int,
                 device, max_tokens: int | None = None):
        self.group, self.rank, self.size = group, rank, size
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.first, self.count = expert_range(num_experts, rank, size)
        E, W = num_experts, size
        # route[r, c]: the id rank r computes for a clamped id c = clamp(id, -2, E), indexed like
        # Python (column E: an id outside [-1, E), which -2 reaches by wrapping; column E + 1:
        # id -1): the local id at the owner, -1 elsewhere; a bad id is rank 0's count (an id
        # rank 0 poisons)
        route = torch.full((W, E + 2), -1, dtype=torch.int32)
        for r in range(W):
            f, c = expert_range(E, r, W)
            route[r, f:f + c] = torch.arange(c, dtype=torch.int32)
        route[0, E] = expert_range(E, 0, W)[1]
        self._route = route.to(self.device)
        self._buffers = {}
        if size > 1:  # the send rows: one Triton launch on GPUs, its PyTorch twin elsewhere (chosen once)
            from ..kernels import ep_dispatch

            self._fill = ep_dispatch.fill_send_rows if self.device.type == "cuda" else ep_dispatch.fill_send_rows_torch

    # --- the transport ---------------------------------------------------------------------
    def _all_to_all(self, send, recv, send_splits=None, recv_splits=None):
        """recv <- the rows the peers sent; a group of one exchanges nothing (returns send)."""
        if self.size == 1:
            return send
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        return recv

    def run(self, plan, x, topk_ids, topk_weights, out, shared_output=None):
        """Dispatch, compute on `plan` (the local experts' qmoe.dispatch.Plan, top_k = k),
        combine into out.

        x: [M, H] contiguous; topk_ids: [M, k] int32 contiguous (global ids); topk_weights:
        [M, k] fp32 contiguous; out: [M, H] of x's dtype; shared_output: [M, H] or None (added
        once, in float32, in the combine). M may be 0 (the rank still serves its peers)."""
        if self.max_tokens is None:
            return self._run_counted(plan, x, topk_ids, topk_weights, out, shared_output)
        return self._run_fixed(plan, x, topk_ids, topk_weights, out, shared_output)

    def _compute(self, plan, x, ids, w, y, shared_output=None):
        """The local plan on rows x / ids / w into y; ids the local backend does not have (a bad
        id routed here) give NaN rows, by the backend itself or by run_poisoning."""
        n = x.shape[0]
        if n == 0:
            return y
        backend, run = plan.runner(n)
        if backend.poisons_bad_ids or self.rank != 0:  # bad ids are sent to rank 0 only
            return run(x, ids, w, y, shared_output)
        return run_poisoning(run, self.count, x, ids, w, y, shared_output)

    # --- counts exchanged on the host ------------------------------------------------------
    def _run_counted(self, plan, x, topk_ids, topk_weights, out, shared_output):
        W, E, H = self.size, self.num_experts, self.hidden_size
        M, k = topk_ids.shape
        routed = self._route[:, topk_ids.clamp(-2, E).to(torch.int64)]   # [W, M, k]
        pairs = (routed >= 0).any(dim=2).nonzero()           # [n_send, 2] (rank, token), by rank
        dest, token = pairs[:, 0], pairs[:, 1]
        send_counts = torch.bincount(dest, minlength=W)
        recv_counts = self._all_to_all(send_counts, torch.empty_like(send_counts))
        sizes = torch.cat([send_counts, recv_counts]).tolist()  # the one host synchronization
        send_splits, recv_splits = sizes[:W], sizes[W:]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        send_x = x.index_select(0, token)
        send_ids = routed[dest, token]                       # [n_send, k] int32
        send_w = topk_weights.index_select(0, token)
        recv_x = self._all_to_all(send_x, x.new_empty(n_recv, H), send_splits, recv_splits)
        recv_ids = self._all_to_all(send_ids, send_ids.new_empty(n_recv, k), send_splits, recv_splits)
        recv_w = self._all_to_all(send_w, send_w.new_empty(n_recv, k), send_splits, recv_splits)
        y = self._compute(plan, recv_x, recv_ids, recv_w, x.new_empty(n_recv, H))
        back = self._all_to_all(y, x.new_empty(n_send, H), recv_splits, send_splits)

        partial = x.new_zeros(W, M, H)                       # rank r's partial output of token t
        partial[dest, token] = back
        return combine(partial, out, shared_output)

    # --- fixed buffers ---------------------------------------------------------------------
    def buffers(self, dtype: torch.dtype) -> SimpleNamespace:
        """The fixed buffers for activations of `dtype`, allocated on first use (call once
        before capturing a CUDA graph; qmoe.timing.capture_graph's warm-up call does).

        send_x, recv_x: [W * T, H]; send_ids, recv_ids: [W * T, k] int32; send_w, recv_w:
        [W * T, k] fp32; y, back: [W * T, H] (the local experts' outputs, the partial outputs
        that come back); T = max_tokens. A group of one needs none (its rows are x): it gets
        send_ids only.
        """
        b = self._buffers.get(dtype)
        if b is None:
            W, T, k, H, dev = self.size, self.max_tokens, self.top_k, self.hidden_size, self.device
            b = SimpleNamespace()
            b.send_ids = torch.full((W * T, k), -1, dtype=torch.int32, device=dev)
            if W > 1:
                b.send_x = torch.zeros(W * T, H, dtype=dtype, device=dev)   # finite unused rows
                b.send_w = torch.zeros(W * T, k, dtype=torch.float32, device=dev)
                b.recv_x, b.recv_ids = torch.zeros_like(b.send_x), torch.full_like(b.send_ids, -1)
                b.recv_w = torch.zeros_like(b.send_w)
                b.y, b.back = torch.zeros_like(b.send_x), torch.zeros_like(b.send_x)
            self._buffers[dtype] = b
        return b

    def _run_fixed(self, plan, x, topk_ids, topk_weights, out, shared_output):
        W, T, H = self.size, self.max_tokens, self.hidden_size
        M = topk_ids.shape[0]
        if W == 1:  # the chunk is x itself, its route the identity on ids, the one partial out
            return self._compute(plan, x, topk_ids, topk_weights, out, shared_output)
        b = self.buffers(x.dtype)
        self._fill(self._route, x, topk_ids, topk_weights, b.send_x, b.send_ids, b.send_w)
        recv_x = self._all_to_all(b.send_x, b.recv_x)
        recv_ids = self._all_to_all(b.send_ids, b.recv_ids)
        recv_w = self._all_to_all(b.send_w, b.recv_w)
        self._compute(plan, recv_x, recv_ids, recv_w, b.y)
        back = self._all_to_all(b.y, b.back)
        return combine(back.view(W, T, H)[:, :M], out, shared_output)


def combine(partial: torch.Tensor, out: torch.Tensor, shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum over ranks r of partial[r, t] (+ shared_output[t]).

    partial: [W, M, H] the ranks' partial outputs (x's dtype); out: [M, H]; shared_output:
    [M, H] float or None. One float32 reduction over the W ranks (its order depends on the
    shapes only), rounded once into out."""
    if out.shape[0] == 0:
        return out
    if shared_output is None and out.is_cuda:  # CUDA reductions accumulate bf16 / fp16 in float32
        return torch.sum(partial, dim=0, out=out)
    acc = partial.sum(dim=0, dtype=torch.float32)  # (CPU ones of bf16 would not: float32 asked for)
    if shared_output is not None:
        acc += shared_output
    out.copy_(acc)
    return out


__all__ = ["ExpertDispatch", "combine"]
