"""E2M1 (FP4) element codes and nibble packing, shared by mxfp4 and nvfp4.

An E2M1 code is 4 bits: bit 3 is the sign, bits 2..0 index the magnitudes
{0, 0.5, 1, 1.5, 2, 3, 4, 6}. There is no Inf or NaN; code 8 is -0.
Packing everywhere in the field: two codes per byte, the LOW nibble holds the
even element (2i), the high nibble the odd one (2i+1).
"""

from __future__ import annotations

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)
E2M1_MAX = 6.0

# Midpoints between neighbouring magnitudes. A value exactly on a midpoint
# rounds to the even code (round-half-to-even on the code, as IEEE does on the
# mantissa): 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0,
# 3.5 -> 4.0, 5.0 -> 4.0.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_encode(a: torch.Tensor) -> torch.Tensor:
    """Round values to the nearest E2M1 code (ties to the even code).

    a: any float tensor, already divided by its block scale; |a| > 6 saturates
    to 6 (callers choose scales so that this never happens).
    Returns uint8 codes 0..15 of the same shape. The sign is kept as IEEE rounding
    keeps it: -0.0 and negatives that round to zero give code 8 (-0), so every
    code re-encodes to itself.
    """
    mag = a.abs()
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for i, t in enumerate(_MIDPOINTS):
        up = mag > t
        if i % 2 == 1:  # the code above is even: the tie goes up
            up = up | (mag == t)
        code += up.to(torch.uint8)
    sign = torch.signbit(a).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes 0..15 -> their E2M1 values in `dtype` (code 8 gives -0.0)."""
    lut = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    return lut[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 codes (0..15) -> [..., K/2] uint8, low nibble = even element.

    K must be even. Inverse: `unpack_nibbles`.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last dimension must be even, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] uint8 codes; inverse of `pack_nibbles`."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
