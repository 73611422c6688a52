"""NVFP4: E2M1 elements, one E4M3 (float8_e4m3fn) scale per 16 elements along K,
and an fp32 global scale g per matrix: x = code * s_e4m3 * g.

Global scale (the usual choice): g = amax / (6 * 448), so the largest block
scale is 448, E4M3's largest finite value. Block scales round UP to the next
E4M3 value so that no element clips.
"""

from __future__ import annotations

import torch

from ._fp4 import E2M1_MAX, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles

NAME = "nvfp4"
BLOCK = 16
SCALE_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0


def global_scale_for(amax: torch.Tensor) -> torch.Tensor:
    """fp32 g = amax / (6 * 448) per matrix; 1.0 where amax is 0 (an all-zero matrix)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def _e4m3_round_up(s: torch.Tensor) -> torch.Tensor:
    """Smallest float8_e4m3fn value >= s for s in [0, 448] (fp32 in, e4m3 out)."""
    q = s.to(torch.float8_e4m3fn)  # nearest
    low = q.float() < s
    # the next representable value up: bump the byte (positive e4m3 bytes are monotonic);
    # selecting on the uint8 view keeps float8 out of torch.where on every torch version
    b = q.view(torch.uint8)
    return torch.where(low, b + 1, b).view(torch.float8_e4m3fn)


def quantize(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    """x: [..., N, K] float (K % 16 == 0).

    Returns (data [..., K/2] uint8, scales [..., K/16] float8_e4m3fn,
    global_scale fp32 of shape x.shape[:-2] (one per matrix; a 0-d tensor for 1-D or 2-D x)).
    """
    xf = x.float()
    lead = x.shape[:-2]
    if global_scale is None:
        # Inf/NaN elements must not set the scale of the whole matrix: their blocks get a NaN
        # scale below, and the finite blocks keep the global scale they would have had.
        finite = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros_like(xf))
        amax = torch.zeros(lead, dtype=torch.float32, device=x.device)
        if finite.numel():
            amax = finite.reshape(*lead, -1).amax(dim=-1) if x.dim() >= 2 else finite.amax()
        global_scale = global_scale_for(amax)
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(lead)
    g_b = g.reshape(*lead, 1, 1, 1) if x.dim() >= 2 else g.reshape(1, 1)
    blocks = xf.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax_b = blocks.abs().amax(dim=-1, keepdim=True)
    target = (amax_b / (E2M1_MAX * g_b)).clamp(0, E4M3_MAX)
    # a block holding Inf or NaN gets a NaN scale and dequantizes to NaN, as mxfp4's 0xFF does
    target = torch.where(torch.isfinite(amax_b), target, torch.full_like(target, float("nan")))
    s = _e4m3_round_up(target)
    denom = s.float() * g_b
    a = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), torch.zeros_like(blocks))
    codes = e2m1_encode(a.clamp(-E2M1_MAX, E2M1_MAX)).reshape(x.shape)
    return pack_nibbles(codes), s.squeeze(-1), g


def dequantize(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """data [..., N, K/2] uint8, scales [..., N, K/16] e4m3, global_scale [...] fp32 -> float32 [..., N, K]."""
    vals = e2m1_decode(unpack_nibbles(data))
    K = vals.shape[-1]
    g = global_scale.float()
    g = g.reshape(*g.shape, 1, 1, 1) if data.dim() >= 2 else g.reshape(1, 1)
    vals = vals.reshape(*vals.shape[:-1], K // BLOCK, BLOCK) * (scales.float().unsqueeze(-1) * g)
    return vals.reshape(*vals.shape[:-2], K)
