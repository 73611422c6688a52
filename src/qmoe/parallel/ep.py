"""Expert parallelism: each (token, slot) pair goes to the rank that owns its expert as one row,
is computed there by that rank's backend, and comes back to the token's rank as one row.

Per call, on every rank of the group (a rank with no tokens still takes part: it computes the
rows the others send):
1. dispatch: slot (t, j) of expert e becomes a row [x[t]] with the local id e - first(owner)
   and the weight topk_weights[t, j], sent to owner(e) by all_to_all_single (ids -1 and ids
   outside [-1, E) are not sent);
2. compute: the owner runs its local plan on the rows it received as a top_k = 1 problem, so
   every row's output is that one slot's weighted output, in x's dtype;
3. combine: the rows go back the same way, are put in slot order, [M, k, H], and summed over
   the k slots in float32 by one reduction whose order depends on the shapes only, then rounded
   once to x's dtype. Which rank computed which slot cannot change the sum: the placement only
   changes where a slot's row was computed, never the order it is added in. Rows of tokens
   with an id outside [-1, E) become NaN (their slots read a NaN row).

Two transports, the same rows:
- counts exchanged on the host (max_tokens None): the send counts go first (an all_to_all of
  W integers, one host synchronization), then exactly the routed rows. Any M; not capturable.
- fixed buffers (max_tokens given): rank pair (source, destination) has max_tokens x top_k
  rows, slot s of the source at row s of its chunk, rows not used carry id -1. Equal splits, no
  counts, no host sync, buffers allocated once per dtype: CUDA-graph capturable (with a
  capturable backend). Each call moves W x max_tokens x top_k rows each way whatever the routing.

A group of one rank exchanges nothing: the send buffer is the receive buffer (no collective is
launched); everything else runs as for W ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

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
        owner = torch.empty(E, dtype=torch.int64)
        local = torch.empty(E, dtype=torch.int64)
        for r in range(W):
            f, c = expert_range(E, r, W)
            owner[f:f + c] = r
            local[f:f + c] = torch.arange(c)
        # Tables indexed by ids.clamp(-2, E): column E = an id outside [-1, E) (E and -2 land
        # there; -2 by wrapping around), column E + 1 = id -1 (wrapping around).
        dest = torch.cat([owner, torch.tensor([W, W])])
        self._dest = dest.to(self.device)                                     # owner; W: not sent
        self._local = torch.cat([local, torch.tensor([-1, -1])]).to(self.device, torch.int32)
        self._bad = torch.tensor([0] * E + [1, 0], dtype=torch.int64, device=self.device)
        self.cap = None
        if max_tokens is not None:
            cap = self.cap = max_tokens * top_k
            route = torch.full((W, E + 2), -1, dtype=torch.int32)
            route[owner, torch.arange(E)] = local.to(torch.int32)
            self._route = route.to(self.device)                               # [W, E+2] id sent to r
            # chunk of the row sent and of the row read back: the owner's; a slot not sent
            # writes (and reads back the zero output of) rank 0's row s, which carries id -1
            # since the slot is rank 0's only if it is sent; a bad id reads the NaN chunk
            send_row = torch.where(dest < W, dest * cap, 0)
            back_row = send_row.clone()
            back_row[E] = W * cap
            self._rows = torch.stack([send_row, back_row], dim=1).to(self.device)  # [E+2, 2]
            self._slot = torch.arange(cap, dtype=torch.int64, device=self.device).unsqueeze(1)
        self._buffers = {}

    # --- the transport ---------------------------------------------------------------------
    def _all_to_all(self, send, recv, send_splits=None, recv_splits=None):
        """recv <- the rows the peers sent; a group of one exchanges nothing (returns send)."""
        if self.size == 1:
            return send
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        return recv

    def run(self, plan, x, topk_ids, topk_weights, out, shared_output=None):
        """Dispatch, compute on `plan` (the local experts' qmoe.dispatch.Plan), combine into out.

        x: [M, H] contiguous; topk_ids: [M, k] int32 contiguous (global ids); topk_weights:
        [M, k] fp32 contiguous; out: [M, H] of x's dtype; shared_output: [M, H] or None (added
        once, in float32, in the combine). M may be 0 (the rank still serves its peers)."""
        if self.max_tokens is None:
            return self._run_counted(plan, x, topk_ids, topk_weights, out, shared_output)
        return self._run_fixed(plan, x, topk_ids, topk_weights, out, shared_output)

    # --- counts exchanged on the host ------------------------------------------------------
    def _run_counted(self, plan, x, topk_ids, topk_weights, out, shared_output):
        W, E, H = self.size, self.num_experts, self.hidden_size
        M, k = topk_ids.shape
        n = M * k
        c = topk_ids.reshape(-1).clamp(-2, E).to(torch.int64)
        dest = self._dest[c]                                  # [n] owner rank, W = not sent
        order = torch.argsort(dest, stable=True)              # slots grouped by rank, slot order inside
        counts = torch.zeros(W + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, dest, torch.ones_like(dest))
        send_counts = counts[:W].contiguous()
        recv_counts = self._all_to_all(send_counts, torch.empty_like(send_counts))
        sizes = torch.cat([send_counts, recv_counts]).tolist()  # the one host synchronization
        send_splits, recv_splits = sizes[:W], sizes[W:]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        sel = order[:n_send]
        send_x = x.index_select(0, torch.div(sel, k, rounding_mode="floor"))
        send_ids = self._local[c].index_select(0, sel)
        send_w = topk_weights.reshape(-1).index_select(0, sel)
        recv_x = self._all_to_all(send_x, x.new_empty(n_recv, H), send_splits, recv_splits)
        recv_ids = self._all_to_all(send_ids, send_ids.new_empty(n_recv), send_splits, recv_splits)
        recv_w = self._all_to_all(send_w, send_w.new_empty(n_recv), send_splits, recv_splits)

        back = x.new_empty(n_send + 2, H)                     # + a zero row and a NaN row
        back[n_send].zero_()
        back[n_send + 1].fill_(float("nan"))
        y = back[:n_recv] if W == 1 else x.new_empty(n_recv, H)
        if n_recv:
            _, run = plan.runner(n_recv)
            run(recv_x, recv_ids.view(n_recv, 1), recv_w.view(n_recv, 1), y)
        self._all_to_all(y, back[:n_send], recv_splits, send_splits)

        pos = torch.empty_like(order)
        pos[order] = torch.arange(n, device=x.device)
        rows = torch.where(dest < W, pos, n_send + self._bad[c])
        return combine(back, rows, M, k, out, shared_output)

    # --- fixed buffers ---------------------------------------------------------------------
    def buffers(self, dtype: torch.dtype) -> SimpleNamespace:
        """The fixed buffers for activations of `dtype`, allocated on first use (call once
        before capturing a CUDA graph; qmoe.timing.capture_graph's warm-up call does).

        send_x, recv_x: [W * cap, H]; send_ids, recv_ids: [W, cap] int32; send_w, recv_w:
        [W, cap] fp32; y: [W * cap, H] (the local experts' output); back: [(W + 1) * cap, H]
        (results per source slot, then a NaN chunk for bad ids); cap = max_tokens * top_k.
        In a group of one the receive buffers are the send buffers and y is back's first chunk.
        """
        b = self._buffers.get(dtype)
        if b is None:
            W, cap, H, dev = self.size, self.cap, self.hidden_size, self.device
            b = SimpleNamespace()
            b.send_x = torch.zeros(W * cap, H, dtype=dtype, device=dev)  # finite padding rows
            b.send_ids = torch.full((W, cap), -1, dtype=torch.int32, device=dev)
            b.send_w = torch.zeros(W, cap, dtype=torch.float32, device=dev)
            b.back = torch.zeros((W + 1) * cap, H, dtype=dtype, device=dev)
            b.back[W * cap:] = float("nan")
            if W == 1:
                b.recv_x, b.recv_ids, b.recv_w, b.y = b.send_x, b.send_ids, b.send_w, b.back[:cap]
            else:
                b.recv_x, b.recv_ids = torch.zeros_like(b.send_x), torch.full_like(b.send_ids, -1)
                b.recv_w, b.y = torch.zeros_like(b.send_w), torch.zeros(W * cap, H, dtype=dtype, device=dev)
            self._buffers[dtype] = b
        return b

    def _run_fixed(self, plan, x, topk_ids, topk_weights, out, shared_output):
        W, E, cap = self.size, self.num_experts, self.cap
        M, k = topk_ids.shape
        n = M * k
        b = self.buffers(x.dtype)
        c = topk_ids.reshape(-1).clamp(-2, E).to(torch.int64)
        rows = self._rows[c] + self._slot[:n]                 # [n, 2]: row sent, row of the result
        b.send_x.index_put_((rows[:, 0].view(M, k),), x.unsqueeze(1))
        b.send_ids[:, :n] = self._route[:, c]                 # the local id at its owner, -1 elsewhere
        if n < cap:
            b.send_ids[:, n:] = -1
        b.send_w[:, :n] = topk_weights.reshape(1, n)
        recv_x = self._all_to_all(b.send_x, b.recv_x)
        recv_ids = self._all_to_all(b.send_ids, b.recv_ids)
        recv_w = self._all_to_all(b.send_w, b.recv_w)
        _, run = plan.runner(W * cap)
        run(recv_x, recv_ids.view(W * cap, 1), recv_w.view(W * cap, 1), b.y)
        self._all_to_all(b.y, b.back[:W * cap])
        return combine(b.back, rows[:, 1], M, k, out, shared_output)


def combine(rows_out: torch.Tensor, rows: torch.Tensor, M: int, k: int, out: torch.Tensor,
            shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum over slots j of rows_out[rows[t * k + j]] (+ shared_output[t]).

    rows_out: [R, H] per-slot weighted outputs (x's dtype); rows: [M * k] int64 row of each
    slot; out: [M, H]; shared_output: [M, H] float or None. The sum is one float32 reduction
    over the k slots of a [M, k, H] tensor laid out in slot order (the reduction's order depends
    on shapes only), rounded once into out."""
    if M == 0:
        return out
    y = rows_out.index_select(0, rows).view(M, k, rows_out.shape[1])
    if shared_output is None and out.is_cuda:  # CUDA reductions accumulate bf16 / fp16 in float32
        return torch.sum(y, dim=1, out=out)
    acc = y.sum(dim=1, dtype=torch.float32)  # (CPU ones of bf16 would not: float32 asked for)
    if shared_output is not None:
        acc += shared_output
    out.copy_(acc)
    return out


__all__ = ["ExpertDispatch", "combine"]
