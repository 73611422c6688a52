"""qmoe.formats: exact codes, scales and error bounds of mxfp4, nvfp4, int4 and bf16."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qmoe
from qmoe.formats import QuantizedTensor, block_size, dequantize, quantize
from qmoe.formats._fp4 import e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from qmoe.formats.mxfp4 import block_exponent, e8m0_to_float
from qmoe.formats.nvfp4 import global_scale_for


def e2m1_value(code: int) -> float:
    """E2M1 from its bits (sign | 2 exponent bits | 1 mantissa bit, bias 1), independent of qmoe's table."""
    sign = -1.0 if code & 8 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return sign * mag


GRID = torch.tensor(sorted({abs(e2m1_value(c)) for c in range(16)}), dtype=torch.float64)
E4M3_POSITIVE = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # 0 .. 448


def codes_of(q: QuantizedTensor) -> torch.Tensor:
    return unpack_nibbles(q.data)


def nearest_grid_distance(a: torch.Tensor) -> torch.Tensor:
    """float64 distance from |a| to the nearest E2M1 magnitude."""
    return (a.abs().unsqueeze(-1) - GRID).abs().amin(dim=-1)


def local_step(a: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid around |a| (0.5 below 2, 1 below 4, 2 up to 6)."""
    a = a.abs()
    return torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).double()


def block_scale64(q: QuantizedTensor) -> torch.Tensor:
    """Per-element float64 scale (block scale x global scale), shape q.shape."""
    if q.format == "mxfp4":
        s = torch.ldexp(torch.ones(q.scales.shape, dtype=torch.float64), q.scales.long() - 127)
    elif q.format == "nvfp4":
        g = q.global_scale.double()
        s = q.scales.double() * g.reshape(*g.shape, 1, 1)
    else:
        s = q.scales.double()
    return s.repeat_interleave(block_size(q.format), dim=-1)


# --- E2M1 -----------------------------------------------------------------------------------------

def test_every_e2m1_code_decodes_and_reencodes_to_itself():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    for c in range(16):
        want = e2m1_value(c)
        assert vals[c].item() == want, c
        assert bool(torch.signbit(vals[c])) == bool(c & 8), c  # code 8 is -0.0
    assert torch.equal(e2m1_encode(vals), codes)


def test_every_e2m1_code_through_quantize():
    # a block whose amax is 6 gets scale 2^0, so each E2M1 value must come out as its own code
    vals = e2m1_decode(torch.arange(16, dtype=torch.uint8))
    q = quantize(torch.cat([vals, vals]).reshape(1, 32), "mxfp4")
    assert q.scales.tolist() == [[127]]
    assert codes_of(q).tolist() == [list(range(16)) * 2]
    assert torch.equal(dequantize(q)[0], torch.cat([vals, vals]))


MIDPOINT_TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


@pytest.mark.parametrize("mid,want", MIDPOINT_TIES)
def test_e2m1_midpoints_round_to_even_code_and_neighbours_to_nearest(mid, want):
    lo = max(v for v in GRID.tolist() if v < mid)
    hi = min(v for v in GRID.tolist() if v > mid)
    t = torch.tensor([mid], dtype=torch.float32)
    below = torch.nextafter(t, torch.tensor(-math.inf))
    above = torch.nextafter(t, torch.tensor(math.inf))
    for sign in (1.0, -1.0):
        for x, expect in ((t, want), (below, lo), (above, hi)):
            got = e2m1_decode(e2m1_encode(sign * x))
            assert got.item() == sign * expect, (sign * x.item(), got.item())
    # ties go to the code with mantissa bit 0
    assert int(e2m1_encode(t)) % 2 == 0


def test_e2m1_ties_through_quantize():
    mids = [m for m, _ in MIDPOINT_TIES]
    row = [6.0] + mids + [-m for m in mids] + [0.0] * (32 - 1 - 2 * len(mids))
    q = quantize(torch.tensor([row]), "mxfp4")
    want = [6.0] + [w for _, w in MIDPOINT_TIES] + [-w for _, w in MIDPOINT_TIES]
    assert dequantize(q)[0, :len(want)].tolist() == want


def test_e2m1_saturates_above_six():
    assert e2m1_decode(e2m1_encode(torch.tensor([7.0, -100.0]))).tolist() == [6.0, -6.0]


# --- E8M0 and mxfp4 -------------------------------------------------------------------------------

def test_e8m0_every_byte():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    v = e8m0_to_float(b)
    for byte in range(255):
        assert v[byte].item() == 2.0 ** (byte - 127), byte
    assert v[0].item() == 2.0 ** -127 and v[0].item() > 0  # 0x00 is 2^-127, not zero
    assert v[0x7F].item() == 1.0
    assert v[0xFE].item() == 2.0 ** 127
    assert math.isnan(v[0xFF].item())


def test_mxfp4_dequantize_edge_scale_bytes():
    codes = torch.tensor([[1, 2, 3, 0, 9, 10, 4, 12] * 4] * 4, dtype=torch.uint8)
    scales = torch.tensor([[0x00], [0x7F], [0xFE], [0xFF]], dtype=torch.uint8)
    q = QuantizedTensor("mxfp4", (4, 32), pack_nibbles(codes), scales)
    d = dequantize(q)
    assert d.dtype == torch.float32
    for row, byte in enumerate((0x00, 0x7F, 0xFE)):
        want = torch.tensor([e2m1_value(int(c)) * 2.0 ** (byte - 127) for c in codes[row]], dtype=torch.float64)
        assert torch.equal(d[row], want.float()), byte  # 2 * 2^127 overflows float32 to inf, as it must
    assert d[0, 0].item() == 2.0 ** -128  # a subnormal float32, kept exactly
    assert torch.isnan(d[3]).all()  # 0xFF: the whole block, zero codes included


def amax_cases() -> list:
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    vals = []
    for k in range(-120, 126):
        for v in (2.0 ** k, 6.0 * 2.0 ** k, 3.0 * 2.0 ** k):
            t = f32(v)
            vals += [t, torch.nextafter(t, f32(math.inf)), torch.nextafter(t, f32(0.0))]
    g = torch.Generator().manual_seed(1)
    vals += list(torch.exp2(torch.empty(500).uniform_(-110, 110, generator=g)))
    return [float(v) for v in vals]


def test_mxfp4_block_exponent_is_ceil_log2_amax_over_6():
    amax = amax_cases()
    want = [math.ceil(math.log2(a / 6.0)) for a in amax]
    for a, e in zip(amax, want):  # the definition, exactly in float64: smallest e with 6 * 2^e >= amax
        assert math.ldexp(6.0, e) >= a > math.ldexp(6.0, e - 1)
    assert block_exponent(torch.tensor(amax)).tolist() == want
    # through quantize: each row's largest element is amax, with either sign
    g = torch.Generator().manual_seed(2)
    a = torch.tensor(amax, dtype=torch.float32)
    x = torch.rand(len(amax), 32, generator=g) * a[:, None]
    x[:, 5] = a * torch.where(torch.arange(len(amax)) % 2 == 0, 1.0, -1.0)
    q = quantize(x, "mxfp4")
    assert (q.scales[:, 0].long() - 127).tolist() == want


def test_mxfp4_tiny_blocks_take_the_smallest_scale_and_do_not_clip():
    x = torch.full((1, 32), 1e-38)  # ceil(log2(amax/6)) = -129 is below E8M0's range
    q = quantize(x, "mxfp4")
    assert q.scales.item() == 0
    assert (dequantize(q) - x).abs().max().item() <= 2.0 ** -128  # half the step at scale 2^-127


def test_all_zero_blocks_are_zero_codes_and_dequantize_to_exact_zero():
    g = torch.Generator().manual_seed(3)
    for fmt in ("mxfp4", "nvfp4", "int4"):
        B = block_size(fmt)
        x = torch.randn(3, 4 * B, generator=g)
        x[1, B:2 * B] = 0.0
        x[2, 3 * B:] = -0.0
        q = quantize(x, fmt)
        codes = codes_of(q)
        assert (codes[1, B:2 * B] == 0).all() and (codes[2, 3 * B:] == 0).all(), fmt
        d = dequantize(q)
        assert (d[1, B:2 * B] == 0).all() and (d[2, 3 * B:] == 0).all(), fmt
        # a whole zero matrix
        z = quantize(torch.zeros(2, 2 * B), fmt)
        assert (z.data == 0).all() and (dequantize(z) == 0).all(), fmt
        assert not torch.isnan(z.scales.float()).any(), fmt
    assert quantize(torch.zeros(2, 32), "mxfp4").scales.tolist() == [[0], [0]]


def gaussian_blocks(n_rows, K, seed):
    """Gaussian rows whose blocks span many magnitudes (the scale must follow each block)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, K, generator=g)
    return x * torch.exp2(torch.randint(-20, 20, (n_rows, K // 32, 1), generator=g).float()).repeat_interleave(
        32, dim=-1).reshape(n_rows, K)


def test_mxfp4_rounds_every_element_to_the_nearest_grid_point_without_clipping():
    x = gaussian_blocks(64, 256, seed=4)
    q = quantize(x, "mxfp4")
    s = block_scale64(q)
    a = x.double() / s  # exact: s is a power of two
    assert a.abs().max().item() <= 6.0  # the block's largest element maps to <= 6: nothing clips
    blocks = a.abs().reshape(64, -1, 32).amax(dim=-1)
    assert (blocks > 3.0).all()  # the exponent is the smallest that fits: a smaller one would clip
    err = (dequantize(q).double() / s - a).abs()
    assert torch.equal(err, nearest_grid_distance(a))  # exactly the nearest point
    assert (err <= local_step(a) / 2).all()


# --- nvfp4 ----------------------------------------------------------------------------------------

def test_nvfp4_global_scale_is_amax_over_6x448_per_matrix():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 64, generator=g) * torch.tensor([1e-3, 1.0, 1e4])[:, None, None]
    x[1] = 0.0
    q = quantize(x, "nvfp4")
    assert q.global_scale.shape == (3,) and q.global_scale.dtype == torch.float32
    for e in (0, 2):
        amax = x[e].abs().max().double().item()
        assert q.global_scale[e].item() == torch.tensor(amax / (6 * 448)).float().item()
    assert q.global_scale[1].item() == 1.0  # all-zero matrix
    assert global_scale_for(torch.tensor(0.0)).item() == 1.0
    # the largest block of a matrix gets the largest E4M3 scale, 448
    assert q.scales[0].float().max().item() == 448.0


def test_nvfp4_block_scales_are_e4m3_rounded_up():
    x = gaussian_blocks(32, 256, seed=6)
    q = quantize(x, "nvfp4")
    assert q.scales.dtype == torch.float8_e4m3fn
    g = q.global_scale.double().item()
    target = x.double().abs().reshape(32, -1, 16).amax(dim=-1) / (6 * g)
    s = q.scales.double()
    assert (s >= target * (1 - 2 ** -22)).all()  # up (within fp32 rounding of the target)
    below = torch.searchsorted(E4M3_POSITIVE, s) - 1  # index of the next smaller E4M3 value
    nonzero = s > 0
    assert (E4M3_POSITIVE[below.clamp(min=0)][nonzero] < target[nonzero]).all()  # the smallest such value


def test_nvfp4_dequantize_is_code_times_scale_times_global():
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (2, 4, 32), generator=g, dtype=torch.uint8)
    scales = torch.tensor([0.5, 448.0, 0.001953125, 3.25]).repeat(2, 4, 1)[..., :2].to(torch.float8_e4m3fn)
    gs = torch.tensor([0.125, 3.0])
    q = QuantizedTensor("nvfp4", (2, 4, 32), pack_nibbles(codes), scales, gs)
    vals = torch.tensor([e2m1_value(c) for c in range(16)], dtype=torch.float64)[codes.long()]
    want = vals * scales.double().repeat_interleave(16, dim=-1) * gs.double()[:, None, None]
    assert torch.equal(dequantize(q).double(), want)


def test_nvfp4_rounds_to_nearest_without_clipping():
    x = gaussian_blocks(32, 256, seed=8)
    q = quantize(x, "nvfp4")
    s = block_scale64(q)
    a = x.double() / s
    assert a.abs().max().item() <= 6.0 * (1 + 2 ** -20)
    err = (dequantize(q).double() / s - a).abs()
    # a = x / (s * g) is computed in fp32 by the quantizer: allow its rounding
    assert (err <= nearest_grid_distance(a) + 2 ** -20 * a.abs()).all()
    assert (err <= local_step(a) / 2 * (1 + 2 ** -20)).all()


def test_nvfp4_non_finite_block_is_nan_and_others_unaffected():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 32, generator=g)
    clean = quantize(x, "nvfp4")
    x[0, 3] = float("inf")
    x[1, 20] = float("nan")
    q = quantize(x, "nvfp4")
    d = dequantize(q)
    assert torch.isnan(d[0, :16]).all() and torch.isnan(d[1, 16:]).all()
    assert q.global_scale.item() == clean.global_scale.item()
    assert torch.equal(d[0, 16:], dequantize(clean)[0, 16:]) and torch.equal(d[1, :16], dequantize(clean)[1, :16])


def test_mxfp4_non_finite_block_gets_nan_scale():
    x = torch.randn(1, 64)
    x[0, 40] = float("nan")
    q = quantize(x, "mxfp4")
    assert q.scales[0, 1].item() == 0xFF
    assert torch.isnan(dequantize(q)[0, 32:]).all() and not torch.isnan(dequantize(q)[0, :32]).any()


# --- int4 -----------------------------------------------------------------------------------------

def test_int4_every_nibble_is_twos_complement():
    codes = torch.arange(32, dtype=torch.uint8).reshape(1, 32) % 16
    q = QuantizedTensor("int4", (1, 32), pack_nibbles(codes), torch.tensor([[0.5]], dtype=torch.bfloat16))
    want = [(c if c < 8 else c - 16) * 0.5 for c in range(16)] * 2
    assert dequantize(q)[0].tolist() == want


def test_int4_rounds_half_to_even_with_scale_amax_over_7():
    halves = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5]
    row = [7.0] + halves + [-h for h in halves] + [0.0] * (32 - 15)
    q = quantize(torch.tensor([row]), "int4")
    assert q.scales.dtype == torch.bfloat16 and q.scales.item() == 1.0
    want = [7.0, 0.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -2.0, -2.0, -4.0, -4.0, -6.0, -6.0]
    assert dequantize(q)[0, :15].tolist() == want


def test_int4_symmetric_range_scale_and_error_bound():
    x = gaussian_blocks(32, 256, seed=10)
    q = quantize(x, "int4")
    amax = x.double().abs().reshape(32, -1, 32).amax(dim=-1)
    assert torch.equal(q.scales, (amax / 7).to(torch.bfloat16))
    ints = codes_of(q).long()
    ints = torch.where(ints >= 8, ints - 16, ints)
    assert ints.min().item() >= -7 and ints.max().item() <= 7  # symmetric: -8 is never produced
    assert (ints.abs().reshape(32, -1, 32).amax(dim=-1) == 7).all()  # each block's largest element -> +-7
    s = block_scale64(q)
    err = (dequantize(q).double() - x.double()).abs()
    assert (err <= s / 2 * (1 + 2 ** -20)).all()


# --- all formats ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_gaussian_relative_error_matches_the_format_grid(fmt):
    # Rounding to nearest on a grid with local step D leaves an error close to uniform on
    # [-D/2, D/2], RMS D / sqrt(12): the expected relative error follows from the steps in use.
    # Truncation would give about twice that; skipping the scale would be far off either way.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 1024, generator=g)
    q = quantize(x, fmt)
    s = block_scale64(q)
    step = (local_step(x.double() / s) if fmt != "int4" else torch.ones_like(s)) * s
    expected = (step.pow(2).mean() / 12).sqrt() / x.double().pow(2).mean().sqrt()
    rel = (dequantize(q).double() - x.double()).norm() / x.double().norm()
    assert 0.8 * expected <= rel <= 1.1 * expected, (rel.item(), expected.item())


def test_bf16_format_is_the_bf16_tensor():
    x = torch.randn(4, 48)
    q = quantize(x, "bf16")
    assert q.data.dtype == torch.bfloat16 and q.scales is None and q.global_scale is None
    assert torch.equal(dequantize(q), x.bfloat16().float())
    assert ((dequantize(q) - x).abs() <= x.abs() * 2 ** -8).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "bf16"])
def test_3d_quantize_is_per_matrix_and_getitem_selects_one(fmt):
    x = torch.randn(3, 8, 64)
    q = quantize(x, fmt)
    assert q.shape == (3, 8, 64) and q.format == fmt
    for e in range(3):
        one = quantize(x[e], fmt)
        assert torch.equal(q[e].data, one.data)
        if fmt != "bf16":
            assert torch.equal(q[e].scales.view(torch.uint8), one.scales.view(torch.uint8))
        if fmt == "nvfp4":
            assert q[e].global_scale.item() == one.global_scale.item()
        assert torch.equal(dequantize(q[e]), dequantize(q)[e])
    sub = q[1:3]
    assert sub.shape == (2, 8, 64) and torch.equal(dequantize(sub), dequantize(q)[1:3])
    assert q[-1].shape == (8, 64) and torch.equal(dequantize(q[-1]), dequantize(q)[2])
    assert torch.equal(dequantize(q[torch.tensor(1)]), dequantize(q)[1])


# --- packing --------------------------------------------------------------------------------------

codes_strategy = st.integers(0, 4).flatmap(lambda rows: st.integers(0, 24).flatmap(
    lambda half: st.lists(st.lists(st.integers(0, 15), min_size=2 * half, max_size=2 * half),
                          min_size=rows, max_size=rows)))


@settings(max_examples=150, deadline=None)
@given(codes_strategy)
def test_pack_unpack_round_trip_and_low_nibble_is_even_element(rows):
    K = len(rows[0]) if rows else 0
    c = torch.tensor(rows, dtype=torch.uint8).reshape(len(rows), K)
    p = pack_nibbles(c)
    assert p.dtype == torch.uint8 and p.shape == (len(rows), K // 2)
    assert torch.equal(unpack_nibbles(p), c)
    assert p.tolist() == [[row[2 * i] | (row[2 * i + 1] << 4) for i in range(K // 2)] for row in rows]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=0, max_size=64))
def test_unpack_pack_round_trip_on_any_bytes(b):
    p = torch.tensor(b, dtype=torch.uint8)
    c = unpack_nibbles(p)
    assert c.shape == (2 * len(b),) and bool((c <= 15).all())
    assert torch.equal(pack_nibbles(c), p)


def test_pack_odd_length_is_an_error():
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


# --- QuantizedTensor ------------------------------------------------------------------------------

def test_nbytes():
    assert quantize(torch.randn(4, 64), "mxfp4").nbytes == 4 * 32 + 4 * 2
    assert quantize(torch.randn(3, 4, 32), "nvfp4").nbytes == 3 * 4 * 16 + 3 * 4 * 2 + 3 * 4
    assert quantize(torch.randn(4, 64), "int4").nbytes == 4 * 32 + 4 * 2 * 2
    assert quantize(torch.randn(4, 64), "bf16").nbytes == 4 * 64 * 2


def test_to_moves_every_tensor():
    q = quantize(torch.randn(2, 4, 32), "nvfp4")
    m = q.to("meta")
    assert m.shape == q.shape and m.format == "nvfp4"
    assert m.data.is_meta and m.scales.is_meta and m.global_scale.is_meta and m.device.type == "meta"
    back = quantize(torch.randn(2, 4, 32), "mxfp4").to("cpu")
    assert back.device.type == "cpu" and back.global_scale is None


def _mx(shape=(4, 64)):
    return quantize(torch.randn(*shape), "mxfp4")


@pytest.mark.parametrize("make,match", [
    (lambda: QuantizedTensor("mxfp4", (4, 64), _mx().data[:, :16], _mx().scales), r"data: expected torch.uint8 of shape \[4, 32\], got torch.uint8 of shape \[4, 16\]"),
    (lambda: QuantizedTensor("mxfp4", (4, 64), _mx().data.to(torch.int8), _mx().scales), r"data: expected torch.uint8 .* got torch.int8"),
    (lambda: QuantizedTensor("mxfp4", (4, 64), _mx().data, None), r"scales: expected .*got NoneType"),
    (lambda: QuantizedTensor("mxfp4", (4, 64), _mx().data, _mx().scales.float()), r"scales: expected torch.uint8 of shape \[4, 2\], got torch.float32"),
    (lambda: QuantizedTensor("mxfp4", (4, 64), _mx().data, _mx().scales[:, :1]), r"scales: expected torch.uint8 of shape \[4, 2\], got torch.uint8 of shape \[4, 1\]"),
    (lambda: QuantizedTensor("mxfp4", (4, 64), _mx().data, _mx().scales, torch.ones(())), r"global_scale: expected None for mxfp4"),
    (lambda: QuantizedTensor("mxfp4", (4, 48), _mx().data[:, :24], _mx().scales), r"shape: expected \[..., K\] with K a multiple of 32 for mxfp4, got \[4, 48\]"),
    (lambda: QuantizedTensor("nvfp4", (2, 4, 32), torch.zeros(2, 4, 16, dtype=torch.uint8),
                             torch.zeros(2, 4, 2, dtype=torch.float8_e4m3fn), None), r"global_scale: expected a torch.float32 tensor of shape \[2\], got NoneType"),
    (lambda: QuantizedTensor("nvfp4", (2, 4, 32), torch.zeros(2, 4, 16, dtype=torch.uint8),
                             torch.zeros(2, 4, 2, dtype=torch.float8_e4m3fn), torch.ones(3)), r"global_scale: expected torch.float32 of shape \[2\], got torch.float32 of shape \[3\]"),
    (lambda: QuantizedTensor("nvfp4", (2, 4, 32), torch.zeros(2, 4, 16, dtype=torch.uint8),
                             torch.zeros(2, 4, 2, dtype=torch.uint8), torch.ones(2)), r"scales: expected torch.float8_e4m3fn"),
    (lambda: QuantizedTensor("int4", (4, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2)), r"scales: expected torch.bfloat16 .* got torch.float32"),
    (lambda: QuantizedTensor("bf16", (4, 64), torch.zeros(4, 64)), r"data: expected torch.bfloat16 of shape \[4, 64\], got torch.float32"),
    (lambda: QuantizedTensor("bf16", (4, 64), torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(4, 2)), r"scales: expected None for bf16"),
    (lambda: QuantizedTensor("mxfp4", (4, 64), _mx().data, _mx().scales.to("meta")), r"scales: expected device cpu .* got meta"),
    (lambda: QuantizedTensor("fp8", (4, 64), _mx().data, _mx().scales), r"format: expected one of mxfp4, nvfp4, int4, bf16, got 'fp8'"),
])
def test_quantized_tensor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_getitem_errors():
    with pytest.raises(IndexError, match="3 or more dimensions"):
        _mx()[0]
    with pytest.raises(IndexError, match="an int or a slice, got tuple"):
        _mx((2, 4, 64))[0, 1]


@pytest.mark.parametrize("x,fmt,match", [
    (torch.randn(4, 33), "mxfp4", r"x: mxfp4 quantizes the last dimension in blocks of 32; got shape \[4, 33\]"),
    (torch.randn(4, 40), "int4", r"x: int4 quantizes the last dimension in blocks of 32; got shape \[4, 40\]"),
    (torch.randn(4, 24), "nvfp4", r"x: nvfp4 quantizes the last dimension in blocks of 16; got shape \[4, 24\]"),
    (torch.randn(32), "nvfp4", r"x: nvfp4 needs a matrix"),
    (torch.ones(4, 32, dtype=torch.int32), "mxfp4", r"x: expected a floating-point tensor, got torch.int32"),
    (torch.tensor(1.0), "mxfp4", r"x: mxfp4 quantizes the last dimension in blocks of 32; got shape \[\]"),
    ([1.0] * 32, "mxfp4", r"x: expected a floating-point tensor, got list"),
    (torch.randn(4, 32), "fp8", r"format: expected one of"),
])
def test_quantize_errors(x, fmt, match):
    with pytest.raises(ValueError, match=match):
        quantize(x, fmt)


def test_dequantize_rejects_a_plain_tensor():
    with pytest.raises(ValueError, match="q: expected a QuantizedTensor, got Tensor"):
        dequantize(torch.zeros(4))


def test_public_names():
    assert qmoe.FORMATS == ("mxfp4", "nvfp4", "int4", "bf16")
    assert [block_size(f) for f in qmoe.FORMATS] == [32, 16, 32, 1]
