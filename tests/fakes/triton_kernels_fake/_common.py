"""What both fake generations share: their own MXFP4 decode tables, triton_kernels' swiglu in
torch, the MoE row math, keyword-only entry points and the call record. Nothing here comes
from qmoe (the code under test)."""

from __future__ import annotations

import inspect

import torch

CALLS: list = []
"""(entry point, details dict) per fake kernel call."""

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class FakeKernelError(RuntimeError):
    """What a real kernel would do with this input (assert, wrong answer, crash), raised instead."""


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise FakeKernelError(f"fake triton_kernels: {msg}")


def keywords_only(fn):
    """`fn` with its own signature that refuses positional arguments (qmoe must call with keywords)."""
    sig = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        check(not args, f"{fn.__name__} called with {len(args)} positional argument(s)")
        sig.bind(**kwargs)  # TypeError on unknown or missing names, like the real function
        return fn(**kwargs)

    wrapper.__signature__ = sig
    wrapper.__name__ = fn.__name__
    wrapper.__wrapped_fake__ = fn
    return wrapper


def decode_k_major(codes: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """codes: uint8 [E, >=K/2, N], byte j of column n holding k = 2j (low nibble) and 2j + 1;
    scales: uint8 E8M0 [E, >=ceil(K/32), N]. -> float32 [E, K, N]."""
    table = torch.tensor(_E2M1, dtype=torch.float32, device=codes.device)
    c = codes[:, :k // 2].to(torch.int64)
    nib = torch.stack((c & 0xF, c >> 4), dim=2).reshape(c.shape[0], k, c.shape[2])  # [E, K, N]
    vals = table[nib & 7] * torch.where(nib >= 8, -1.0, 1.0)
    exps = scales[:, :(k + 31) // 32].to(torch.float32) - 127.0
    scale = torch.exp2(exps).repeat_interleave(32, dim=1)[:, :k]
    return vals * scale


def swiglu_interleaved(h: torch.Tensor, alpha: float, limit) -> torch.Tensor:
    """triton_kernels' swiglu on interleaved columns (even: gate, odd: linear): [R, 2n] -> [R, n].
    gate = min(gate, limit); linear = clamp(linear, -limit, limit); gate * sigmoid(alpha * gate) * (linear + 1)."""
    gate, linear = h[:, 0::2], h[:, 1::2]
    if limit is not None:
        gate = gate.clamp(max=limit)
        linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def expert_rows(x_rows: torch.Tensor, experts: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """x_rows [R, K] @ w[experts] ([R] of [E, K, N]) + bias[experts] -> float32 [R, N]."""
    out = torch.empty(x_rows.shape[0], w.shape[2], dtype=torch.float32, device=x_rows.device)
    for e in torch.unique(experts).tolist():
        sel = experts == e
        out[sel] = x_rows[sel].float() @ w[e]
        if bias is not None:
            out[sel] += bias[e].float()
    return out
