"""The kernel weight layout and its inverse (kernels/layout.py)."""

import pytest
import torch

import qmoe
from qmoe.kernels.layout import (E2M1_WORD_BITS, INT4_WORD_BITS, KT, NVFP4_CODE_BIAS, PANEL, from_kernel_layout,
                                 nvfp4_codes_problem, nvfp4_scale_codes, nvfp4_scales_of_codes, to_kernel_layout)
from qmoe.kernels.moe import MoEKernelWeights

SCALE_DTYPES = {"mxfp4": torch.uint8, "nvfp4": torch.float8_e4m3fn, "int4": torch.bfloat16}


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
@pytest.mark.parametrize("halves,N,K", [(1, 96, 160), (2, 2 * 72, 64), (1, 256, 384)])
def test_round_trip(fmt, halves, N, K):
    q = qmoe.quantize(torch.randn(3, N, K), fmt)
    block = qmoe.formats.block_size(fmt)
    d, s = to_kernel_layout(q.data, q.scales, block, halves=halves)
    kp = 2 * d.shape[2] * d.shape[3]
    assert d.shape[1] % 128 == 0 and kp % KT == 0 and d.shape[3] == PANEL
    assert d.transpose(1, 2).is_contiguous(), "stored in panel order: [E, K/(2P), N, P]"
    # scale rows start on 8-byte boundaries (mxfp4 at K = 384: 12-byte rows, 16 apart)
    assert s.shape[2] == kp // block and s.stride(1) * s.element_size() % 8 == 0
    for view in (d, d.contiguous()):   # panel order, and the same view in row order
        d2, s2 = from_kernel_layout(view, s, N, K, block, SCALE_DTYPES[fmt], halves=halves)
        assert torch.equal(d2, q.data)
        assert torch.equal(s2.view(torch.uint8), q.scales.view(torch.uint8))


def test_panel_order_in_memory():
    """Byte j of row n (expert e) sits at e * N * K/2 + (j // P) * N * P + n * P + j % P of the
    storage: each panel of all rows is one contiguous run."""
    codes = torch.randint(0, 16, (2, 128, 384), dtype=torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    d, _ = to_kernel_layout(packed, torch.zeros(2, 128, 12, dtype=torch.uint8), 32)
    rows = d.reshape(2, 128, 192)                     # row order
    flat = torch.as_strided(d, (d.numel(),), (1,))    # the storage
    e, n, j = torch.meshgrid(torch.arange(2), torch.arange(128), torch.arange(192), indexing="ij")
    at = e * 128 * 192 + (j // PANEL) * 128 * PANEL + n * PANEL + j % PANEL
    assert torch.equal(flat[at], rows)


@pytest.mark.parametrize("fmt,word_bits", [("mxfp4", E2M1_WORD_BITS), ("nvfp4", E2M1_WORD_BITS),
                                           ("int4", INT4_WORD_BITS)])
def test_round_trip_with_word_bits(fmt, word_bits):
    q = qmoe.quantize(torch.randn(2, 2 * 80, 224), fmt)
    block = qmoe.formats.block_size(fmt)
    d, s = to_kernel_layout(q.data, q.scales, block, halves=2, word_bits=word_bits)
    d2, s2 = from_kernel_layout(d, s, 2 * 80, 224, block, SCALE_DTYPES[fmt], halves=2, word_bits=word_bits)
    assert torch.equal(d2, q.data) and torch.equal(s2.view(torch.uint8), q.scales.view(torch.uint8))


def test_word_bits_give_the_values_the_gpu_decode_extracts():
    """The rotations and masks of the GPU decode (kernels/_moe_kernels.py) applied to arranged
    words give pair t (word q: elements 2q, 2q + 1 of the quad's half t) where bf16 wants it
    (sign at bit 15, magnitude at bits 6..8 of each 16-bit lane); int4's nibble shifts give the
    same pairs."""
    codes = torch.randint(0, 16, (3, 128), dtype=torch.uint8)  # one mxfp4 / int4 quad per row
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    half = codes.long().view(3, 4, 16, 2)                      # [row, half t, word q, element of the pair]
    for word_bits in (E2M1_WORD_BITS, INT4_WORD_BITS):
        d, _ = to_kernel_layout(packed[None], torch.zeros(1, 3, 4, dtype=torch.uint8), 32, word_bits=word_bits)
        b = d[0, :3].reshape(3, -1)[:, :64].long().view(3, 16, 4)
        w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
        if word_bits is E2M1_WORD_BITS:
            rotl = (lambda v, r: ((v << r) | (v >> (32 - r))) & 0xFFFFFFFF)
            pairs = [w & 0x81C081C0, rotl(w, 4) & 0x81C081C0, rotl(w, 10) & 0x81C081C0,
                     (rotl(w, 6) & 0x80C080C0) | (rotl(w, 14) & 0x01000100)]
            bf16 = lambda c: ((c & 8) << 12) | ((c & 7) << 6)
        else:
            pairs = [(w >> (4 * t)) & 0x000F000F for t in range(4)]
            bf16 = lambda c: c
        for t, got in enumerate(pairs):
            assert torch.equal(got, bf16(half[:, t, :, 0]) | bf16(half[:, t, :, 1]) << 16)


def test_fold_flag_follows_the_largest_mxfp4_scale():
    E, I, H = 2, 64, 64
    small = qmoe.ExpertWeights.from_float(torch.randn(E, 2 * I, H) / 8, torch.randn(E, H, I) / 8, "mxfp4")
    big = qmoe.ExpertWeights.from_float(torch.randn(E, 2 * I, H) * 100, torch.randn(E, H, I) / 8, "mxfp4")
    for w, fold13 in ((small, True), (big, False)):
        kw = MoEKernelWeights.from_canonical("mxfp4", w.w13.data, w.w13.scales, w.w2.data, w.w2.scales)
        assert (kw.fold13, kw.fold2) == (fold13, True)


def test_nvfp4_scale_codes_round_trip_and_give_the_decode_its_bf16():
    """Every non-negative finite E4M3 byte (subnormals included) has a code; the code's bf16 bits
    (code * 16 + bias, the GPU decode's one instruction) are the scale x 2^118 exactly."""
    raw = torch.arange(0x7F, dtype=torch.int16).to(torch.uint8)
    codes = nvfp4_scale_codes(raw)
    assert torch.equal(nvfp4_scales_of_codes(codes), raw)
    assert int(codes[0]) == 0 and codes[1:].ge(1).all() and int(codes.max()) == 143
    assert len(set(codes.tolist())) == 0x7F
    bits = (codes[1:].to(torch.int32) * 16 + NVFP4_CODE_BIAS).to(torch.int16).view(torch.bfloat16).float()
    assert torch.equal(bits, raw[1:].view(torch.float8_e4m3fn).float() * 2.0 ** 118)
    for bad in (0x7F, 0x80, 0xB8, 0xFF):   # NaN, -0, a negative scale, NaN
        with pytest.raises(ValueError, match="no code"):
            nvfp4_scale_codes(torch.tensor([0x38, bad], dtype=torch.uint8))
    for bad in (2, 144, 255):   # 2..8 lie in the gaps between the subnormals' codes
        with pytest.raises(ValueError, match="no scale's"):
            nvfp4_scales_of_codes(torch.tensor([9, bad], dtype=torch.uint8))
    stack = torch.randint(0, 0x7F, (3, 5, 7), dtype=torch.uint8)   # expert by expert, any shape
    assert torch.equal(nvfp4_scales_of_codes(nvfp4_scale_codes(stack)), stack)


def test_nvfp4_codes_only_where_exact():
    """Codes are used when every scale is non-negative and finite and zero scales hold only +-0
    codes; otherwise the raw E4M3 bytes stay (fold off), and both round-trip."""
    E, I, H = 2, 64, 64
    w = qmoe.ExpertWeights.from_float(torch.randn(E, 2 * I, H), torch.randn(E, H, I), "nvfp4")
    assert nvfp4_codes_problem(w.w13.data, w.w13.scales) is None
    for byte in (0x80, 0x7F, 0xFF):   # -0, NaN, NaN
        odd = w.w2.scales.clone()
        odd.view(torch.uint8)[1, 2, 0] = byte
        assert "negative, -0 or NaN" in nvfp4_codes_problem(w.w2.data, odd)
    zero_scale = w.w13.scales.clone()
    zero_scale.view(torch.uint8)[1, 3, 2] = 0          # a zero scale over non-zero codes
    neg = w.w2.scales.clone()
    neg.view(torch.uint8)[0, 5, 1] |= 0x80             # a negative scale
    zero_codes = w.w13.data.clone()
    zero_codes[1, 3, 16:24] &= 0x88                    # that group's codes made +-0
    assert "zero scale over non-zero codes" in nvfp4_codes_problem(w.w13.data, zero_scale)
    assert "negative" in nvfp4_codes_problem(w.w2.data, neg)
    assert nvfp4_codes_problem(zero_codes, zero_scale) is None
    for d13, s13, s2, folds in ((w.w13.data, w.w13.scales, w.w2.scales, (True, True)),
                                (w.w13.data, zero_scale, neg, (False, False)),
                                (zero_codes, zero_scale, w.w2.scales, (True, True))):
        kw = MoEKernelWeights.from_canonical("nvfp4", d13, s13, w.w2.data, s2, w.w13.global_scale, w.w2.global_scale)
        assert (kw.fold13, kw.fold2) == folds
        assert len(kw.notes) == folds.count(False)   # each matrix on the longer decode says why
        back = kw.to_canonical(torch.float8_e4m3fn)
        assert torch.equal(back[0], d13) and torch.equal(back[2], w.w2.data)
        assert torch.equal(back[1].view(torch.uint8), s13.view(torch.uint8))
        assert torch.equal(back[3].view(torch.uint8), s2.view(torch.uint8))


def test_nibble_placement_and_padding():
    """mxfp4 (G = 32, quads of 128 elements in 64 bytes): element 32t + p of a quad sits in word
    p // 2, byte 2 (t % 2) + p % 2, the low nibble for halves 0 and 1, the high for 2 and 3."""
    codes = torch.randint(0, 16, (1, 3, 200), dtype=torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = torch.randint(0, 255, (1, 3, 200 // 32 + 1), dtype=torch.uint8)[..., : 200 // 32]
    d, s = to_kernel_layout(packed, scales.contiguous(), 32)
    assert d.shape == (1, 128, 128 // PANEL, PANEL) and s.shape == (1, 128, 8)
    d = d.reshape(1, 128, 128)

    def code_at(row, k):
        quad, t, p = k // 128, k % 128 // 32, k % 32
        byte = int(d[0, row, 64 * quad + 4 * (p // 2) + 2 * (t % 2) + p % 2])
        return byte >> 4 if t >= 2 else byte & 0xF

    for row in range(3):
        for k in (0, 1, 5, 31, 32, 63, 64, 97, 127, 128, 150, 199):
            assert code_at(row, k) == int(codes[0, row, k]), (row, k)
    # elements 200..255 are zero codes; rows 3..127 zero
    assert all(code_at(0, k) == 0 for k in range(200, 256))
    assert d[0, 3:].eq(0).all() and s[0, 3:].eq(0).all()
    assert s[0, :3, 6:].eq(0).all()


def test_kernel_weights_round_trip_with_bias_and_global_scales():
    E, I, H = 2, 80, 96
    w = qmoe.ExpertWeights.from_float(torch.randn(E, 2 * I, H), torch.randn(E, H, I), "nvfp4",
                                      torch.randn(E, 2 * I), torch.randn(E, H))
    kw = MoEKernelWeights.from_canonical("nvfp4", w.w13.data, w.w13.scales, w.w2.data, w.w2.scales,
                                         w.w13.global_scale, w.w2.global_scale, w.b13, w.b2)
    assert (kw.Ip, kw.Hp) == (128, 128)
    # the padded gate/up columns carry zero bias so the padded intermediate is exactly 0
    assert kw.b13[:, I:128].eq(0).all() and kw.b13[:, 128 + I:].eq(0).all()
    w13, s13, w2, s2, b13, b2 = kw.to_canonical(torch.float8_e4m3fn)
    assert torch.equal(w13, w.w13.data) and torch.equal(w2, w.w2.data)
    assert torch.equal(s13.view(torch.uint8), w.w13.scales.view(torch.uint8))
    assert torch.equal(s2.view(torch.uint8), w.w2.scales.view(torch.uint8))
    assert torch.equal(b13, w.b13) and torch.equal(b2, w.b2)


def test_rejects_unknown_format():
    with pytest.raises(ValueError, match="fmt: expected one of"):
        MoEKernelWeights.from_canonical("bf16", *(torch.zeros(1, 2, 2, dtype=torch.uint8),) * 4)


def test_kernel_weights_refuse_a_layout_the_kernels_cannot_read():
    """MoEKernelWeights says why for weights not in the kernel layout's [E, N, K/(2P), P] view
    (row-major [E, N, K/2] bytes, or panels that split a chunk pair), and takes the row order."""
    w = qmoe.random_weights(qmoe.MoESpec(num_experts=2, hidden_size=128, intermediate_size=128, top_k=1),
                            "mxfp4", "cpu", seed=0)
    kw = MoEKernelWeights.from_canonical("mxfp4", w.w13.data, w.w13.scales, w.w2.data, w.w2.scales)
    E, N = kw.w13.shape[:2]
    with pytest.raises(ValueError, match="kernel layout"):
        MoEKernelWeights("mxfp4", kw.H, kw.I, kw.w13.reshape(E, N, -1), kw.s13, kw.w2, kw.s2)
    with pytest.raises(ValueError, match="multiple of 64"):
        MoEKernelWeights("mxfp4", kw.H, kw.I, kw.w13.reshape(E, N, -1, 32), kw.s13, kw.w2, kw.s2)
    rows = MoEKernelWeights("mxfp4", kw.H, kw.I, kw.w13.contiguous(), kw.s13, kw.w2.contiguous(), kw.s2)
    assert torch.equal(rows.to_canonical(torch.uint8)[0], w.w13.data)
