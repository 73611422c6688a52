"""Routing: router logits [M, E] -> (topk_ids [M, k] int32, topk_weights [M, k] fp32), on the
logits' device, with no host synchronization.

    ids, weights = qmoe.route(spec, router_logits, correction_bias=None)

`route` is the one public routing: the fused Triton kernel (qmoe.kernels.routing: one launch)
where `routing_support` says it can run (CUDA logits, Triton importable and not interpreted,
a mode and size the kernel covers), else the PyTorch reference (qmoe.routing.reference), which
defines the semantics; both give the same ids and weights. `check_inputs` is the one validation
of routing inputs.
"""

from __future__ import annotations

import functools

import torch

from ..spec import MoESpec
from ..support import Support
from . import reference


def check_inputs(spec: MoESpec, router_logits, correction_bias=None, num_tokens: int | None = None) -> None:
    """ValueError naming the argument unless route(spec, router_logits, correction_bias) can run.

    num_tokens: the M the logits must have (the x they route), or None for any.
    Checks types, shapes, dtypes and devices only (no host sync).
    """
    E = spec.num_experts
    M = "M" if num_tokens is None else num_tokens
    if spec.top_k > E:  # an experts-only spec may have more slots than experts (an EP rank's); routing not
        raise ValueError(f"MoESpec.top_k: routing chooses top_k distinct experts: expected top_k <= num_experts "
                         f"({E}), got {spec.top_k}")
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2 or router_logits.shape[1] != E \
            or (num_tokens is not None and router_logits.shape[0] != num_tokens):
        got = list(router_logits.shape) if isinstance(router_logits, torch.Tensor) else type(router_logits).__name__
        raise ValueError(f"router_logits: expected shape [{M}, {E}], got {got}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits: expected a float tensor, got {router_logits.dtype}")
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or tuple(correction_bias.shape) != (E,):
            got = (list(correction_bias.shape) if isinstance(correction_bias, torch.Tensor)
                   else type(correction_bias).__name__)
            raise ValueError(f"correction_bias: expected shape [{E}], got {got}")
        if not correction_bias.is_floating_point():
            raise ValueError(f"correction_bias: expected a float tensor, got {correction_bias.dtype}")
        if correction_bias.device != router_logits.device:
            raise ValueError(f"correction_bias: expected device {router_logits.device}, "
                             f"got {correction_bias.device}")


@functools.lru_cache(maxsize=None)
def _fused_kernel():
    """(qmoe.kernels.routing or None, why not): imported once."""
    try:
        from ..kernels import interpreted
        from ..kernels import routing as kernel
    except Exception as e:  # no triton, or a triton that fails to import: route in PyTorch
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    if interpreted():
        return None, "TRITON_INTERPRET is set (the interpreter is slower than PyTorch)"
    return kernel, ""


def routing_support(spec: MoESpec, device, logits_dtype: torch.dtype = torch.float32,
                    bias_dtype: torch.dtype | None = None) -> Support:
    """Whether `route` runs the fused Triton routing kernel for this spec, device and dtypes;
    the reason either way. Never raises."""
    if torch.device(device).type != "cuda":
        return Support(False, f"reference routing in PyTorch: the fused kernel needs CUDA logits, got {device}")
    kernel, why = _fused_kernel()
    if kernel is None:
        return Support(False, f"reference routing in PyTorch: {why}")
    for name, dt in (("router_logits", logits_dtype), ("correction_bias", bias_dtype)):
        if dt is not None and dt not in kernel.LOGIT_DTYPES:
            return Support(False, f"reference routing in PyTorch: the fused kernel does not load {name} of {dt}")
    ok, why = kernel.supports(spec.routing.mode, spec.num_experts, spec.top_k)
    return Support(ok, why if ok else f"reference routing in PyTorch: {why}")


def route(spec: MoESpec, router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None):
    """Top-k experts per token: one fused kernel where possible, else the PyTorch reference.

    spec: MoESpec (its routing, num_experts, top_k)
    router_logits: [M, E] float (any float dtype; computed in fp32)
    correction_bias: [E] float or None ("sigmoid_grouped", "sqrt_softplus": selection only)
    Returns topk_ids int32 [M, k], topk_weights float32 [M, k], best first. No host sync;
    CUDA-graph capturable on the fused path.
    """
    if not isinstance(spec, MoESpec):
        raise ValueError(f"spec: expected a MoESpec, got {type(spec).__name__}")
    check_inputs(spec, router_logits, correction_bias)
    bias_dtype = None if correction_bias is None else correction_bias.dtype
    if not routing_support(spec, router_logits.device, router_logits.dtype, bias_dtype).ok:
        return reference.route(spec, router_logits, correction_bias)
    r = spec.routing
    return _fused_kernel()[0].fused_route(
        router_logits, spec.top_k, r.mode, r.renormalize, r.routed_scaling_factor, r.n_group, r.topk_group,
        correction_bias)


__all__ = ["Support", "check_inputs", "route", "routing_support"]
