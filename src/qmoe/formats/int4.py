"""int4 group-32 ("MXINT4" in FlashInfer / TRT-LLM; Kimi-K2.5 W4A16): signed
two's-complement int4 codes in [-8, 7], symmetric (no zero point), one bf16
scale per 32 elements along K: x = code * s.

Scale s = amax / 7 rounded to bf16; codes = round-half-to-even(x / s),
clamped to [-8, 7]. bf16 rounding of s moves x / s by at most 2^-8 relative,
far from the 7.5 rounding edge, so nothing clips.
"""

from __future__ import annotations

import torch

from ._fp4 import pack_nibbles, unpack_nibbles

NAME = "int4"
BLOCK = 32
SCALE_DTYPE = torch.bfloat16
QMAX = 7
QMIN = -8


def codes_to_int(codes: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles 0..15 (two's complement) -> int8 values -8..7."""
    c = codes.to(torch.int16)
    return torch.where(c >= 8, c - 16, c).to(torch.int8)


def quantize(x: torch.Tensor):
    """x: [..., K] float, K % 32 == 0 -> (data [..., K/2] uint8, scales [..., K/32] bf16)."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    s = (amax / QMAX).to(torch.bfloat16)
    sf = s.float()
    q = torch.where(sf > 0, blocks / torch.where(sf > 0, sf, 1.0), torch.zeros_like(blocks))
    q = torch.round(q).clamp(QMIN, QMAX).to(torch.int16)
    codes = (q & 0xF).to(torch.uint8).reshape(x.shape)
    return pack_nibbles(codes), s.squeeze(-1)


def dequantize(data: torch.Tensor, scales: torch.Tensor, global_scale=None) -> torch.Tensor:
    """data [..., K/2] uint8, scales [..., K/32] bf16 -> float32 [..., K]."""
    vals = codes_to_int(unpack_nibbles(data)).float()
    K = vals.shape[-1]
    vals = vals.reshape(*vals.shape[:-1], K // BLOCK, BLOCK) * scales.float().unsqueeze(-1)
    return vals.reshape(*vals.shape[:-2], K)
