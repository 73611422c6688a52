"""Decoders of humming's formats, written from its documented layouts (no qmoe code):

- packed weights: int32 words, element i of a word in bits 4i..4i+3 (little-endian bit stream);
- E2M1 (float4e2m1): bit 3 sign, bits 0..2 index {0, .5, 1, 1.5, 2, 3, 4, 6};
- float4e0m3: sign-magnitude integer, bit 3 sign, bits 0..2 the magnitude 0..7;
- uint4: offset binary, value = code - 8;
- E8M0 scale byte e: 2^(e - 127); E4M3 and bf16 scales: their float value.

The fake kernel layout made by transform.py: weight [E, Kp/8, Np] int32 (the padded packed
weight, transposed), weight_scale [E, Kp/G, Np] (transposed), weight_scale_2 [E] fp32, bias [E, Np].
"""

from __future__ import annotations

import torch

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def unpack4(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> int64 codes [..., 8W]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=words.device)
    return ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(*words.shape[:-1], 8 * words.shape[-1])


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """int64 codes [..., 8W] (0..15) -> int32 [..., W]."""
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    shifts = 4 * torch.arange(8, device=codes.device)
    w = (c << shifts).sum(-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def decode_codes(codes: torch.Tensor, b_dtype: str) -> torch.Tensor:
    sign = torch.where((codes & 8) != 0, -1.0, 1.0)
    if b_dtype == "float4e2m1":
        lut = torch.tensor(_E2M1, device=codes.device)
        return sign * lut[codes & 7]
    if b_dtype == "float4e0m3":
        return sign * (codes & 7).float()
    if b_dtype == "uint4":
        return codes.float() - 8.0
    raise AssertionError(f"fake humming: unknown b_dtype {b_dtype}")


def decode_scales(s: torch.Tensor, bs_dtype: str) -> torch.Tensor:
    if bs_dtype == "float8e8m0":
        e = s.view(torch.uint8).to(torch.float32)
        return torch.where(e == 255, torch.full_like(e, float("nan")), torch.exp2(e - 127.0))
    if bs_dtype in ("float8e4m3", "bfloat16"):
        return s.float()
    raise AssertionError(f"fake humming: unknown bs_dtype {bs_dtype}")


def dequantize(config, weight, weight_scale, weight_scale_2) -> torch.Tensor:
    """The fake kernel layout -> float32 [E, Np, Kp]."""
    codes = unpack4(weight.transpose(1, 2).contiguous())             # [E, Np, Kp]
    vals = decode_codes(codes, config.b_dtype)
    G = config.weight_scale_group_size
    s = decode_scales(weight_scale.transpose(1, 2).contiguous(), config.bs_dtype)  # [E, Np, Kp/G]
    vals = vals * s.repeat_interleave(G, dim=-1)
    if config.weight_scale_2_type == "tensor":
        vals = vals * weight_scale_2.float().reshape(-1, 1, 1)
    return vals
