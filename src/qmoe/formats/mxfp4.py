"""MXFP4 (OCP MX v1.0): E2M1 elements, one E8M0 scale per 32 elements along K.

E8M0 scale byte e means 2^(e - 127); 0xFF is NaN (the whole block is NaN);
there is no zero. The quantizer never clips: the block exponent is
ceil(log2(amax / 6)), so the block's largest magnitude lands at most on 6.
One exception at the very top of the fp32 range: a code whose value times the scale
would exceed the largest finite fp32 (amax above 6 x 2^125 = 2.55e38) rounds down to the
largest code that stays finite, so a finite input never dequantizes to inf.
"""

from __future__ import annotations

import torch

from ._fp4 import E2M1_MAGNITUDES, E2M1_MAX, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles

NAME = "mxfp4"
BLOCK = 32
SCALE_DTYPE = torch.uint8
E8M0_BIAS = 127
E8M0_NAN = 0xFF


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 bytes -> float32 2^(e-127); 0xFF -> NaN. Exact for every byte."""
    x = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device),
                    e.to(torch.int32) - E8M0_BIAS)
    return torch.where(e == E8M0_NAN, torch.full_like(x, float("nan")), x)


def block_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Smallest integer e with 6 * 2^e >= amax (amax > 0, finite), as int32.

    Exact integer arithmetic on the binary exponent: amax = m * 2^p with
    m in [0.5, 1); 6 * 2^(p-3) = 0.75 * 2^p, so e = p - 3 when m <= 0.75, else p - 2.
    """
    m, p = torch.frexp(amax.float())
    return torch.where(m <= 0.75, p - 3, p - 2).to(torch.int32)


def quantize(x: torch.Tensor):
    """x: [..., K] float, K % 32 == 0 -> (data [..., K/2] uint8, scales [..., K/32] uint8)."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    finite = torch.isfinite(amax)
    nonzero = amax > 0
    e = block_exponent(torch.where(finite & nonzero, amax, torch.ones_like(amax)))
    e = e.clamp(-E8M0_BIAS, E8M0_BIAS)
    scale_byte = (e + E8M0_BIAS).to(torch.uint8)
    scale_byte = torch.where(nonzero, scale_byte, torch.zeros_like(scale_byte))
    scale_byte = torch.where(finite, scale_byte, torch.full_like(scale_byte, E8M0_NAN))
    # dividing by a power of two is exact (ldexp), so rounding happens once, in e2m1_encode
    a = torch.ldexp(blocks, (-e).unsqueeze(-1))
    a = torch.where((finite & nonzero).unsqueeze(-1), a, torch.zeros_like(a))
    codes = e2m1_encode(a.clamp(-E2M1_MAX, E2M1_MAX))
    codes = _cap_to_finite(codes, e).reshape(x.shape)
    return pack_nibbles(codes), scale_byte


_FP32_MAX = torch.finfo(torch.float32).max


def _cap_to_finite(codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """codes [..., nb, 32] with block exponents e [..., nb]: magnitudes whose value x 2^e
    would overflow fp32 (only possible for e >= 126) become the largest that does not."""
    if not bool((e >= 126).any()):
        return codes
    mag = codes & 7
    for e_big in (126, 127):
        # the largest magnitude code c with E2M1[c] * 2^e_big finite
        cap = max(c for c, v in enumerate(E2M1_MAGNITUDES) if v * 2.0 ** e_big <= _FP32_MAX)
        mag = torch.where((e == e_big).unsqueeze(-1), mag.clamp(max=cap), mag)
    return (codes & 8) | mag


def dequantize(data: torch.Tensor, scales: torch.Tensor, global_scale=None) -> torch.Tensor:
    """data [..., K/2] uint8, scales [..., K/32] uint8 -> float32 [..., K]."""
    vals = e2m1_decode(unpack_nibbles(data))
    K = vals.shape[-1]
    vals = vals.reshape(*vals.shape[:-1], K // BLOCK, BLOCK) * e8m0_to_float(scales).unsqueeze(-1)
    return vals.reshape(*vals.shape[:-2], K)
