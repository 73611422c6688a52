"""The weight layout qmoe's Triton MoE kernels read, and its inverse.

Canonical (qmoe.weights): packed uint8 [E, N, K/2], low nibble = element 2i, high
nibble = element 2i+1; scales [E, N, K/G].

Kernel layout ("paired half tiles"), per matrix [E, N, K]:
- K is padded with zero codes to Kp, a multiple of KT = 128; N to Np (a multiple of 128)
  with zero rows. For w13 the gate and up halves are padded separately, so rows are
  [gate (I -> Ip); up (I -> Ip)] and the padded intermediate columns compute exactly 0.
- K is cut into halves of G elements (G = the scale block: 32 for mxfp4 / int4, 16 for
  nvfp4), each exactly one scale group, and the halves into quads of four consecutive ones
  (4G elements, 2G bytes per row: a "pair" of two chunks of 2G, whose halves h0..h3 are the
  low and high halves of chunk c and of chunk c + 1, c even). A quad's bytes are G/2 4-byte
  words (G 16-bit elements, two per word); word q holds the 8 codes c0..c7 = h0[2q], h0[2q+1],
  h1[2q], h1[2q+1], h2[2q], h2[2q+1], h3[2q], h3[2q+1]: a bf16 pair of each half, the pair one
  register of an MMA's bf16 operand holds. The kernels read the quad as int16 elements,
  decode a word into four bf16 pairs and multiply each half by its one per-row scale (a
  broadcast) against a contiguous G-column slice of the activations; since nothing narrower
  than 16 bits is loaded, Triton keeps the MMA operands in their native register layout
  (docs/performance.md, session 7).
- Bits inside each word: without `word_bits`, byte i holds c_i (low nibble) and c_{4+i} (high
  nibble). With it, bit b of code i sits at word bit word_bits[i][b] (the word read
  little-endian), so a GPU turns the word into four bf16 pairs with a few shifts and masks
  (E2M1_WORD_BITS, INT4_WORD_BITS: see there).
- Byte order: each row's Kp/2 bytes are cut into panels of PANEL = 64 bytes (128 elements: a quad
  for G = 32, two for G = 16; KT / 2, so every row is whole panels), and an expert's
  panel j of all its rows is stored contiguously: memory order [E, Kp/(2 PANEL), Np, PANEL], handed
  to the kernels as the view [E, Np, Kp/(2 PANEL), PANEL] (strides are the kernels' arguments, so
  the plain row order, the view made contiguous, runs too). A program's loop iteration then reads
  its rows' bytes as runs of (rows x PANEL) contiguous bytes instead of PANEL bytes of each row,
  Kp/2 bytes apart: on an H200 the decode calls took 5-16% longer in row order, prefill (M = 4096)
  3-4% (docs/performance.md, session 13).
- Scales keep their canonical order [E, Np, Kp/G] (half j uses scale j: a quad's four halves
  use four consecutive scales), stored as raw bytes: uint8 (E8M0 for mxfp4, E4M3 bits for
  nvfp4) or int16 (bf16 bits for int4). Each row starts on an 8-byte boundary (mxfp4 rows of
  Kp/32 bytes are padded to a multiple of 8), so the kernels read two chunks' int4 scales, or
  four chunks' one-byte ones, per 64-bit load.

- nvfp4 scales may be stored as codes instead (`nvfp4_scale_codes`): one byte that becomes the
  bf16 the GPU decode multiplies by (E4M3 x 2^118) in one integer instruction, where the raw
  E4M3 bits need about ten. MoEKernelWeights decides per matrix (`nvfp4_codes_problem`).

`to_kernel_layout` and `from_kernel_layout` are inverses, and so are `nvfp4_scale_codes` and
`nvfp4_scales_of_codes` (tests round-trip them).
"""

from __future__ import annotations

import torch

KT = 128
"""K is padded to a multiple of this (a whole number of quads for every format)."""

PAD = 128
"""N and K are padded to multiples of this."""

PANEL = 64
"""Bytes of a row per panel (the module's docstring): KT / 2, so it divides every row's Kp / 2."""


E2M1_WORD_BITS = ((6, 7, 8, 15), (22, 23, 24, 31), (2, 3, 4, 11), (18, 19, 20, 27),
                  (28, 29, 30, 5), (12, 13, 14, 21), (0, 1, 26, 9), (16, 17, 10, 25))
"""E2M1 codes (bits: mantissa, exponent low, exponent high, sign) placed in a 32-bit word so
that
  word & 0x81C081C0                                          = pair (c0, c1),
  rotl(word, 4) & 0x81C081C0                                 = pair (c2, c3),
  rotl(word, 10) & 0x81C081C0                                = pair (c4, c5),
  rotl(word, 6) & 0x80C080C0 | rotl(word, 14) & 0x01000100   = pair (c6, c7),
each pair being two bf16 with the sign at bit 15 and the magnitude bits at the exponent /
mantissa boundary (bits 6..8): value x 2^-126, exact (0.5 is a subnormal). 9 integer
instructions per 8 weights. The decode needs a word's two 16-bit elements in one thread, in
order, as every MMA operand register layout of bf16 keeps them."""

INT4_WORD_BITS = tuple(tuple(16 * (i % 2) + 4 * (i // 2) + b for b in range(4)) for i in range(8))
"""int4 codes: pair j = (c_2j, c_2j+1) sits at nibble j of the low and of the high 16-bit half,
so that (word >> 4j) & 0x000F000F is pair j with one code in each bf16 lane: one shift and one
mask per pair, 3 shifts per word."""


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _unpack(data: torch.Tensor) -> torch.Tensor:
    return torch.stack((data & 0xF, data >> 4), dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)


def _raw_scales(scales: torch.Tensor) -> torch.Tensor:
    if scales.dtype == torch.bfloat16:
        return scales.view(torch.int16)
    return scales.view(torch.uint8)


def _pad_rows_cols(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    out = torch.zeros(n, k, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def chunk_of(block: int) -> int:
    """Elements per chunk (two halves, two scale groups) for a scale block size; the layout's
    quads are two chunks."""
    return 2 * block


def _arrange_words(c: torch.Tensor, word_bits) -> torch.Tensor:
    """Codes of chunk pairs c [..., 4, G] (half, element) -> packed bytes [..., 2G]."""
    *lead, _, g = c.shape
    n = 2 * g
    codes = c.reshape(*lead, 4, g // 2, 2).transpose(-3, -2).reshape(*lead, g // 2, 8).to(torch.int64)
    if word_bits is None:
        word = codes[..., :4] | (codes[..., 4:] << 4)
        return word.to(torch.uint8).reshape(*lead, n)
    word = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=c.device)
    for i, bits in enumerate(word_bits):
        for b, pos in enumerate(bits):
            word |= ((codes[..., i] >> b) & 1) << pos
    shifts = torch.arange(0, 32, 8, device=c.device)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8).reshape(*lead, n)


def _codes_of_words(d: torch.Tensor, word_bits) -> torch.Tensor:
    """Inverse of _arrange_words: packed bytes [..., 2G] -> codes [..., 4, G]."""
    *lead, n = d.shape
    b = d.view(*lead, n // 4, 4).to(torch.int64)
    if word_bits is None:
        codes = torch.cat((b & 0xF, b >> 4), dim=-1)
    else:
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
        codes = torch.stack([sum(((word >> pos) & 1) << j for j, pos in enumerate(bits))
                             for bits in word_bits], dim=-1)
    return codes.view(*lead, n // 4, 4, 2).transpose(-3, -2).reshape(*lead, 4, n // 2).to(torch.uint8)


def to_kernel_layout(data: torch.Tensor, scales: torch.Tensor, block: int, halves: int = 1,
                     word_bits=None):
    """Canonical -> kernel layout for one weight matrix stack.

    data: [E, N, K/2] uint8 (canonical packing); scales: [E, N, K/block] (uint8 /
    float8_e4m3fn / bf16); block: elements per scale (16 or 32);
    halves: 2 for w13 (gate and up halves padded separately), 1 otherwise;
    word_bits: None, E2M1_WORD_BITS or INT4_WORD_BITS (bit positions inside 4-byte words).
    Returns (data [E, Np, Kp/(2 PANEL), PANEL] uint8, scales [E, Np, Kp/block] uint8 or int16),
    where Np = halves * round_up(N / halves, 128) and Kp = round_up(K, 128); data is a view of
    storage in panel order ([E, Kp/(2 PANEL), Np, PANEL]: the module's docstring). The scales are a view
    whose rows start on 8-byte boundaries (their row stride is rounded up to 8 bytes), so that
    the kernels can read them as 64-bit words (MoEKernelWeights.scale_row_align).
    Works one expert at a time, so the temporaries are one expert's codes.
    """
    E, N, K2 = data.shape
    K = 2 * K2
    nh = N // halves
    nhp, Kp = round_up(nh, PAD), round_up(K, KT)
    C = chunk_of(block)
    raw = _raw_scales(scales)
    P = Kp // (2 * PANEL)
    out_d = torch.empty(E, P, halves * nhp, PANEL, dtype=torch.uint8, device=data.device).transpose(1, 2)
    row = round_up(Kp // block, 8 // raw.element_size())
    out_s = torch.zeros(E, halves * nhp, row, dtype=raw.dtype, device=data.device)[..., :Kp // block]
    for e in range(E):
        codes = _unpack(data[e])
        for h in range(halves):
            c = _pad_rows_cols(codes[h * nh:(h + 1) * nh], nhp, Kp).view(nhp, Kp // (2 * C), 4, C // 2)
            out_d[e, h * nhp:(h + 1) * nhp] = _arrange_words(c, word_bits).view(nhp, P, PANEL)
            out_s[e, h * nhp:(h + 1) * nhp] = _pad_rows_cols(raw[e, h * nh:(h + 1) * nh], nhp, Kp // block)
    return out_d, out_s


def from_kernel_layout(data: torch.Tensor, scales: torch.Tensor, n: int, k: int, block: int,
                       scale_dtype: torch.dtype, halves: int = 1, word_bits=None):
    """Kernel layout -> canonical (inverse of `to_kernel_layout`).

    data: [E, Np, Kp/(2 PANEL), PANEL] uint8 (any strides: panel or row order); scales: [E, Np,
    Kp/block] raw; n, k: the logical N and K;
    scale_dtype: the canonical scale dtype to view the raw bytes as; word_bits: as given to
    `to_kernel_layout`.
    Returns (data [E, n, k/2] uint8, scales [E, n, k/block] scale_dtype).
    """
    E, Np, P, pb = data.shape
    Kp = 2 * P * pb
    data = data.reshape(E, Np, Kp // 2)   # row order (a copy from panel order)
    nhp, nh = Np // halves, n // halves
    C = chunk_of(block)
    full = _codes_of_words(data.view(E, Np, Kp // (2 * C), C), word_bits).view(E, Np, Kp)  # halves in K order
    rows = torch.cat([full[:, h * nhp:h * nhp + nh, :k] for h in range(halves)], dim=1)
    packed = rows[..., 0::2] | (rows[..., 1::2] << 4)
    s = torch.cat([scales[:, h * nhp:h * nhp + nh, : k // block] for h in range(halves)], dim=1)
    return packed.contiguous(), s.contiguous().view(scale_dtype)


NVFP4_CODE_BIAS = 0x75F0
"""nvfp4 scale codes: bf16 bits = code * 16 + NVFP4_CODE_BIAS is the E4M3 scale x 2^118, exact.
The 126 positive finite E4M3 values (the subnormals 2^-9 .. 1.75 x 2^-7 too: their 3 significant
bits fit bf16's mantissa) get codes between 1 and 143, with gaps (the subnormals
are sparse in bf16's exponents: codes 2..8, for one, are no scale's). Code 0 is a zero scale; the
GPU decode reads it as 1.875 x 2^108, which is exact only because codes are used only where a
zero scale's group holds nothing but +-0 codes (`nvfp4_codes_problem`)."""


def _e4m3_code_table(device) -> torch.Tensor:
    """int16 [256]: the code of each E4M3 byte, -1 where there is none (negative, NaN)."""
    raw = torch.arange(256, dtype=torch.int16, device=device).to(torch.uint8)
    bits = (raw.view(torch.float8_e4m3fn).float() * 2.0 ** 118).to(torch.bfloat16).view(torch.int16).to(torch.int32)
    code = torch.where(raw == 0, 0, (bits - NVFP4_CODE_BIAS) >> 4)
    ok = (raw < 0x7F) & ((raw == 0) | ((bits - NVFP4_CODE_BIAS) & 15 == 0))
    return torch.where(ok, code, -1).to(torch.int16)


def _lookup(x: torch.Tensor, table: torch.Tensor, what: str) -> torch.Tensor:
    """table[x] as uint8, for uint8 x of any shape and an int16 table [256] with -1 for "none":
    one slice of the first dimension (an expert's scales) at a time, so a large stack's int64
    indices are never all alive at once. ValueError(what) where the table has none."""
    rows = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1)
    out = torch.empty(rows.shape, dtype=torch.uint8, device=x.device)
    for i in range(rows.shape[0]):
        got = table[rows[i].long()]
        if bool((got < 0).any()):
            raise ValueError(what)
        out[i] = got.to(torch.uint8)
    return out.view(x.shape)


def nvfp4_scale_codes(raw: torch.Tensor) -> torch.Tensor:
    """E4M3 scale bytes (uint8, any shape; sign bit clear, not NaN) -> codes (uint8, the same
    shape): 0 for a zero scale, else (bf16 bits of scale x 2^118 - NVFP4_CODE_BIAS) / 16.
    ValueError for a negative or NaN scale (`nvfp4_codes_problem` says so beforehand)."""
    return _lookup(raw, _e4m3_code_table(raw.device), "nvfp4 scale codes: negative or NaN E4M3 scales have no code")


def nvfp4_scales_of_codes(code: torch.Tensor) -> torch.Tensor:
    """Inverse of `nvfp4_scale_codes`: codes (uint8, any shape) -> E4M3 scale bytes (uint8, the
    same shape). ValueError for a code that is no scale's."""
    table = _e4m3_code_table(code.device)
    inverse = torch.full((256,), -1, dtype=torch.int16, device=code.device)
    has = table >= 0
    inverse[table[has].long()] = torch.arange(256, dtype=torch.int16, device=code.device)[has]
    return _lookup(code, inverse, "nvfp4 scale codes: a code that is no scale's")


def nvfp4_codes_problem(data: torch.Tensor, scales: torch.Tensor, block: int = 16) -> str | None:
    """Why one matrix stack's nvfp4 scales cannot be stored as codes with the GPU decode exact, or
    None: every scale must be non-negative and finite, and every group with a zero scale must hold
    only +-0 codes (its values are 0 whatever the scale is read as).

    data: [E, N, K/2] uint8 canonical packing; scales: [E, N, K/block] float8_e4m3fn (or raw
    uint8). One expert at a time, so the temporaries are one expert's bytes."""
    raw = _raw_scales(scales)
    for e in range(raw.shape[0]):
        if bool((raw[e] >= 0x7F).any()):   # sign bit set (0x80.., -0 included) or NaN (0x7F, 0xFF)
            return f"expert {e} has a negative, -0 or NaN E4M3 scale"
        zero = raw[e] == 0
        if bool(zero.any()):
            nonzero = ((data[e].view(*zero.shape, block // 2) & 0x77) != 0).any(-1)  # a magnitude bit set
            if bool((zero & nonzero).any()):
                return f"expert {e} has a zero scale over non-zero codes"
    return None
