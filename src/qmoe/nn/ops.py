"""qmoe's torch.library custom ops: the experts (and route + experts) as single graph nodes.

    torch.ops.qmoe.experts(x, topk_ids, topk_weights, out, shared_output, handle) -> ()
    torch.ops.qmoe.route_experts(x, router_logits, correction_bias, out, shared_output, handle) -> ()

Both write the result into the caller's `out` (declared mutated; nothing else is) and return
nothing, so torch.compile keeps the buffer the caller made and CUDA-graph capture sees no new
allocation of its own. `handle` is an int naming a live qmoe.MoE in this module's registry
(`register`): the op carries no Python object, so one compiled graph serves every token count M
(M is an ordinary symbolic size; the MoE's plan resolves the backend for each new M on its first
call, inside the op, at no recompilation). The fake (meta) implementations do nothing: the ops
only mutate `out`, whose shape, dtype and device the caller chose.

Use `experts(...)` and `route_experts(...)` below (they allocate `out` when not given and return
it); qmoe.nn.MoELayer calls them with its own handle.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

from ..moe import MoE

_LIVE: "weakref.WeakValueDictionary[int, MoE]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)
_LOCK = threading.Lock()


def new_handle() -> int:
    """A fresh handle (an int never given out before in this process)."""
    with _LOCK:
        return next(_NEXT)


def register(moe: MoE, handle: int | None = None) -> int:
    """Make `moe` reachable from the ops under `handle` (a fresh one when None) and return the
    handle. The registry holds the MoE weakly: whoever made it keeps it alive (MoELayer does).
    Registering under a handle in use replaces that MoE (re-planning after a device move)."""
    if not isinstance(moe, MoE):
        raise ValueError(f"moe: expected a qmoe.MoE, got {type(moe).__name__}")
    if handle is None:
        handle = new_handle()
    elif not isinstance(handle, int) or isinstance(handle, bool) or handle < 1:
        raise ValueError(f"handle: expected a handle from new_handle() (an int >= 1), got {handle!r}")
    with _LOCK:
        _LIVE[handle] = moe
    return handle


def unregister(handle: int) -> None:
    """Forget `handle` (later calls with it raise); unknown handles are ignored."""
    with _LOCK:
        _LIVE.pop(handle, None)


def lookup(handle: int) -> MoE:
    """The MoE registered under `handle`; ValueError when there is none (deleted, say)."""
    moe = _LIVE.get(handle)
    if moe is None:
        raise ValueError(f"handle: no live qmoe.MoE is registered under {handle} (the layer that made it "
                         f"was deleted, or the handle is not one from qmoe.nn.ops.register)")
    return moe


# --- the ops ------------------------------------------------------------------------------------
@torch.library.custom_op("qmoe::experts", mutates_args=("out",), schema=(
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor(a!) out, Tensor? shared_output, int handle) -> ()"))
def _experts_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor,
                shared_output: torch.Tensor | None, handle: int) -> None:
    lookup(handle).experts(x, topk_ids, topk_weights, out=out, shared_output=shared_output)


@_experts_op.register_fake
def _experts_fake(x, topk_ids, topk_weights, out, shared_output, handle) -> None:
    return None


@torch.library.custom_op("qmoe::route_experts", mutates_args=("out",), schema=(
    "(Tensor x, Tensor router_logits, Tensor? correction_bias, Tensor(a!) out, Tensor? shared_output, "
    "int handle) -> ()"))
def _route_experts_op(x: torch.Tensor, router_logits: torch.Tensor, correction_bias: torch.Tensor | None,
                      out: torch.Tensor, shared_output: torch.Tensor | None, handle: int) -> None:
    lookup(handle)(x, router_logits, correction_bias, out=out, shared_output=shared_output)


@_route_experts_op.register_fake
def _route_experts_fake(x, router_logits, correction_bias, out, shared_output, handle) -> None:
    return None


def _out_for(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out


def experts(handle: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            out: torch.Tensor | None = None, shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """The experts of the MoE registered under `handle`, from given routing (torch.ops.qmoe.experts).

    x: [M, H] bf16 (fp16, fp32 accepted); topk_ids: [M, k] int32 (-1 = no expert);
    topk_weights: [M, k] float32; out: [M, H] of x's dtype, contiguous, or None (allocated);
    shared_output: [M, H] float, contiguous, or None (added to the result).
    Returns out (the very tensor given), [M, H] in x's dtype. Validation is MoE.experts'.
    """
    out = _out_for(x, out)
    torch.ops.qmoe.experts(x, topk_ids, topk_weights, out, shared_output, handle)
    return out


def route_experts(handle: int, x: torch.Tensor, router_logits: torch.Tensor,
                  correction_bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """Route (qmoe.route) and compute the experts of the MoE under `handle`
    (torch.ops.qmoe.route_experts).

    x: [M, H] bf16 (fp16, fp32 accepted); router_logits: [M, E] float;
    correction_bias: [E] float or None (selection only: sigmoid_grouped, sqrt_softplus);
    out: [M, H] of x's dtype, contiguous, or None (allocated); shared_output: [M, H] or None.
    Returns out, [M, H] in x's dtype.
    """
    out = _out_for(x, out)
    torch.ops.qmoe.route_experts(x, router_logits, correction_bias, out, shared_output, handle)
    return out


__all__ = ["experts", "lookup", "new_handle", "register", "route_experts", "unregister"]
