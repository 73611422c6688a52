"""The triton backend against the reference backend (float64), outputs poisoned with NaN.

On a CPU these run through Triton's interpreter on tiny shapes; marked `gpu` tests run real
preset shapes and CUDA-graph capture on a GPU. The interpreter rounds fp32 -> bf16 by
truncation (the GPU rounds to nearest), so CPU errors are about twice the GPU's; the bound
1e-2 holds for both.
"""

import dataclasses

import pytest
import torch

import qmoe
from qmoe.backends import get_backend
from qmoe.backends.reference import reference_moe
import qmoe.kernels.moe as km
from qmoe.kernels.moe import KernelConfig
from qmoe.weights import random_weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = 1e-2
FORMATS = ("mxfp4", "nvfp4", "int4")


def make(E, k, H, I, fmt, bias=True, limit=7.0, seed=0):
    spec = qmoe.MoESpec(E, k, H, I, qmoe.SwiGLU(1.702, 1.0, limit), bias=bias, name="t")
    g = torch.Generator().manual_seed(seed)
    w = qmoe.ExpertWeights.from_float(
        torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / I ** 0.5, fmt,
        torch.randn(E, 2 * I, generator=g) if bias else None, torch.randn(E, H, generator=g) if bias else None)
    return spec, w.to(DEVICE)


def inputs(spec, M, seed, drop=0.1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1000 + seed)
    x = (2 * torch.randn(M, spec.hidden_size, generator=g)).to(dtype)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[: spec.top_k] for _ in range(M)]) \
        if M else torch.zeros(0, spec.top_k, dtype=torch.long)
    ids = torch.where(torch.rand(ids.shape, generator=g) < drop, -1, ids).to(torch.int32)
    w = torch.rand(M, spec.top_k, generator=g)
    return x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


CASES = [  # E, k, H, I, M  (H and I not multiples of the 128 tile in most)
    (4, 1, 64, 64, 1), (4, 2, 96, 160, 3), (8, 4, 160, 96, 17), (8, 3, 64, 256, 64), (6, 4, 256, 64, 0),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("E,k,H,I,M", CASES)
def test_matches_reference(fmt, E, k, H, I, M):
    spec, w = make(E, k, H, I, fmt, seed=E + H + I)
    moe = qmoe.MoE(spec, w, backend="triton")
    x, ids, tw = inputs(spec, M, seed=M)
    out = torch.full((M, H), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    res = moe.experts(x, ids, tw, out=out)
    assert res is out
    if M == 0:
        return
    assert torch.isfinite(out).all(), "every output element must be written"
    assert rel_err(out, reference_moe(spec, w, x, ids, tw)) < TOL


@pytest.mark.parametrize("cfg", [KernelConfig(16, 32, 64, False, k_unroll=2), KernelConfig(32, 64, 32, False),
                                 KernelConfig(16, 32, 32, False, k_unroll=2, split_k=2),
                                 KernelConfig(16, 32, 32, False, k_unroll=2, split_k=4, split_k1=2),
                                 KernelConfig(16, 32, 32, False, k_unroll=2, split_k=2, split_k1=4, direct=True),
                                 KernelConfig(16, 32, 64, False, k_unroll=2, scale_words=True),
                                 KernelConfig(16, 32, 32, False, k_unroll=4, split_k=2, split_k1=2, scale_words=True),
                                 KernelConfig(64, 128, 128, False, num_warps=8)])
def test_configs_agree(cfg):
    spec, w = make(8, 4, 160, 96, "mxfp4")
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    x, ids, tw = inputs(spec, 21, seed=5)
    out = torch.full((21, 160), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    b.forward(prep, x, ids, tw, out, config=cfg)
    assert rel_err(out, reference_moe(spec, w, x, ids, tw)) < TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k_gemm1_is_deterministic_and_leaves_its_counters_at_zero(fmt):
    """GEMM1 in 4 K parts (the last program of each tile adds the partial sums in split order):
    two calls agree bitwise, match the reference, and every counter is back at 0 after a call.
    H = 160 pads to 256: 4 chunks of 64 (nvfp4: 8 of 32), parts of 2 (k_unroll 2): for mxfp4 and
    int4 the last two parts are empty and the second holds only the masked tail past H."""
    from qmoe.kernels import moe as kmoe

    spec, w = make(8, 4, 160, 96, fmt, seed=7)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    x, ids, tw = inputs(spec, 5, seed=11)
    cfg = KernelConfig(16, 32, 32, False, k_unroll=2, split_k=2, split_k1=4)
    outs = []
    for _ in range(2):
        out = torch.full((5, 160), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        b.forward(prep, x, ids, tw, out, config=cfg)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], reference_moe(spec, w, x, ids, tw)) < TOL
    assert prep.meta["kernel_weights"].counters, "the split-K calls keep their counters with the weights"
    assert not kmoe.split_counters(prep.meta["kernel_weights"], 1).any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("programs,cfg", [
    (1, KernelConfig(16, 32, 32, False, k_unroll=2, split_k=2, direct=True, stream_k1=1)),
    (40, KernelConfig(16, 32, 32, False, k_unroll=2, whole_k=True, stream_k1=1)),
    (100, KernelConfig(8, 32, 32, True, k_unroll=4, direct=True, stream_k1=2))])
def test_stream_k_gemm1_matches_is_deterministic_and_leaves_its_counters_at_zero(fmt, programs, cfg, monkeypatch):
    """GEMM1 as stream-K on `programs` programs (the SM count stands in for the interpreter's 1):
    one program runs every tile (each tile whole); 40 programs share the 9 grouped blocks' tiles
    (dead blocks included) so that tiles have two contributors and programs two tiles, whole_k
    (one unit per iteration, x masked); 100 programs are more than the units (8-row blocks,
    k_unroll 4: no iteration inside H = 160, so a tile is one unit of remainder pairs, 32 units). Two calls
    agree bitwise, match the reference, and every counter is back at 0."""
    spec, w = make(8, 4, 160, 96, fmt, seed=7)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    x, ids, tw = inputs(spec, 5, seed=11)
    monkeypatch.setattr(km, "sm_count", lambda device: programs // cfg.stream_k1)
    outs = []
    for _ in range(2):
        out = torch.full((5, 160), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        stats = {}
        km.fused_moe(x, ids, tw, prep.meta["kernel_weights"], 1.702, 1.0, 7.0, cfg, out, stats=stats)
        outs.append(out)
    assert stats["gemm1"]["grid"] == programs
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], reference_moe(spec, w, x, ids, tw)) < TOL
    assert not km.split_counters(prep.meta["kernel_weights"], 1).any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_words_give_the_same_bits(fmt):
    """Scales loaded as 32- and 64-bit words (scale_words) are the same scales: the output is
    bitwise the one-byte loads', with 2 and 4 chunks per iteration (4: the 64-bit words of four
    chunks' one-byte scales) and, for mxfp4, with scale rows only 4-byte aligned (32-bit words
    alone). H = 320: 5 chunks of 64, 10 of 32 for nvfp4, so the main loop and the tail both run."""
    from qmoe.kernels.moe import fused_moe

    spec, w = make(4, 2, 320, 128, fmt, seed=3)
    kw = get_backend("triton").prepare(spec, w).meta["kernel_weights"]
    x, ids, tw = inputs(spec, 3, seed=2)
    runs = [(kw, False), (kw, True)]
    if fmt == "mxfp4":
        four = _shift_scale_rows(kw, 4)
        assert four.scale_words_level() == (1, None)
        runs.append((four, True))
    for u in (2, 4):
        outs = []
        for weights, words in runs:
            out = torch.full((3, 320), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            cfg = KernelConfig(16, 32, 32, False, k_unroll=u, scale_words=words)
            outs.append(fused_moe(x, ids, tw, weights, 1.702, 1.0, 7.0, cfg, out))
        assert torch.isfinite(outs[0]).all() and all(torch.equal(outs[0], o) for o in outs[1:]), u


def _shift_scale_rows(kw, n):
    """The same kernel weights with s13's rows n elements further apart (a copy: rows off their
    8-byte boundary when n * element size is not a multiple of 8)."""
    pad = torch.zeros(*kw.s13.shape[:2], kw.s13.stride(1) + n, dtype=kw.s13.dtype, device=kw.s13.device)
    shifted = pad[..., :kw.s13.shape[2]]
    shifted.copy_(kw.s13)
    return dataclasses.replace(kw, s13=shifted, counters=[])


def _zero_groups(w):
    """Three scale groups of w13 and of w2 (nvfp4) made zero: scale 0 over +-0 codes (0x0 / 0x8),
    which the scale codes read as a finite scale (exact only because the codes are +-0)."""
    for m in (w.w13, w.w2):
        for e, n, g in ((0, 1, 0), (1, 3, 1), (w.num_experts - 1, 0, 2)):
            m.scales.view(torch.uint8)[e, n, g] = 0
            m.data[e, n, 8 * g:8 * g + 8] = torch.tensor([0x00, 0x88, 0x08, 0x80] * 2, dtype=torch.uint8)
    return w


def _raw_nvfp4_twin(kw):
    """The same nvfp4 kernel weights with raw E4M3 scales (the long decode, fold off)."""
    from qmoe.kernels.layout import nvfp4_scales_of_codes

    assert kw.fmt == "nvfp4" and kw.fold13 and kw.fold2
    return dataclasses.replace(kw, s13=nvfp4_scales_of_codes(kw.s13), s2=nvfp4_scales_of_codes(kw.s2),
                               fold13=False, fold2=False, counters=[])


def test_nvfp4_scale_codes_give_the_raw_scales_bits():
    """nvfp4 through scale codes and through the raw E4M3 bytes: the same output, bitwise."""
    from qmoe.kernels.moe import fused_moe

    spec, w = make(4, 2, 96, 160, "nvfp4", seed=6)
    w = _zero_groups(w)
    kw = get_backend("triton").prepare(spec, w).meta["kernel_weights"]
    assert int((kw.s13 == 0).sum()) > 0 and not kw.notes   # zero scales, still on codes
    x, ids, tw = inputs(spec, 5, seed=2)
    cfg = KernelConfig(16, 32, 32, False, k_unroll=2, scale_words=True)
    outs = []
    for weights in (kw, _raw_nvfp4_twin(kw)):
        out = torch.full((5, 96), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        outs.append(fused_moe(x, ids, tw, weights, 1.702, 1.0, 7.0, cfg, out))
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], reference_moe(spec, w, x, ids, tw)) < TOL


@pytest.mark.parametrize("fmt, size, need", [("mxfp4", 128, 4), ("mxfp4", 384, 4), ("int4", 128, 8)])
def test_scale_words_refuse_scale_rows_off_their_boundary(fmt, size, need):
    """The layout starts every scale row on an 8-byte boundary (mxfp4's rows of 4 or 12 bytes
    included), so the kernels take 32- and 64-bit loads; rows moved off the boundary int4 or
    mxfp4 needs are refused."""
    from qmoe.kernels.moe import fused_moe

    spec, w = make(4, 2, size, size, fmt, seed=4)
    kw = get_backend("triton").prepare(spec, w).meta["kernel_weights"]
    assert kw.scale_row_align == 8 and kw.scale_words_level() == (2, None)
    esize = kw.s13.element_size()
    for shift in (1, need // 2 // esize):       # rows moved by `shift` elements: off a need-byte boundary
        bad = _shift_scale_rows(kw, shift)
        assert bad.scale_row_align == min(shift * esize & -(shift * esize), kw.scale_row_align)
        assert bad.scale_words_level()[0] == 0
        x, ids, tw = inputs(spec, 2, seed=1)
        out = torch.empty(2, size, dtype=torch.bfloat16, device=DEVICE)
        cfg = KernelConfig(16, 32, 32, False, k_unroll=2, scale_words=True)
        with pytest.raises(ValueError, match=f"not {need}-byte aligned"):
            fused_moe(x, ids, tw, bad, 1.702, 1.0, 7.0, cfg, out)


def test_the_invariant_family_is_wgmma_and_every_invariant_default_is_in_it():
    """The batch-invariant family: both GEMMs on wgmma (the weight first with tiles of 64 columns
    or more, or 64-row blocks and up with the weight second; whole warpgroups), no split-K or
    stream-K, the slots' rows in bf16; the mma.sync blocks and fp32 rows are outside it. The
    batch-invariant defaults are in it at every M."""
    from qmoe.backends.triton import configs

    inside = [KernelConfig(16, 64, 64, True), KernelConfig(16, 64, 128, True, direct=True, pdl=True),
              KernelConfig(128, 64, 64, True, tail_m=32), KernelConfig(128, 128, 128, True, num_warps=8),
              KernelConfig(64, 64, 64, False), KernelConfig(128, 128, 128, False, num_warps=8)]
    inside = [dataclasses.replace(c, y_bf16=True) for c in inside]   # the family's rows are bf16
    outside = [KernelConfig(16, 64, 64, True), KernelConfig(128, 64, 64, True, tail_m=32)]   # fp32 rows
    outside += [dataclasses.replace(c, y_bf16=True) for c in [
        KernelConfig(16, 64, 64, False), KernelConfig(32, 64, 128, False),   # mma.sync, weight second
        KernelConfig(16, 32, 64, True), KernelConfig(16, 64, 32, True),      # a 32-column tile: mma.sync
        KernelConfig(16, 64, 64, True, num_warps=2),                          # not a warpgroup
        KernelConfig(8, 64, 128, True), KernelConfig(8, 128, 128, True, num_warps=8),  # 8 rows: mma.sync
        KernelConfig(16, 64, 64, True, split_k1=2),
        KernelConfig(16, 64, 64, True, stream_k1=1)]]                        # K cuts depend on the tiles
    outside.append(KernelConfig(16, 64, 64, True, split_k=2))   # split-K GEMM2 (fp32 rows: its parts are summed)
    assert all(configs.invariant(c) for c in inside)
    assert not any(configs.invariant(c) for c in outside)
    for m in (1, 16, 64, 256, 1024, 4096, 8192, 65536):
        for fmt in FORMATS:
            assert configs.invariant(configs.default_config(m, 8, 128, fmt, batch_invariant=True)), (m, fmt)


def test_eight_row_blocks_need_the_weight_first():
    """8-row blocks are the N side of mma.sync's m16n8k16 only with the weight first; with the
    weight second they would be 16 MMA rows of which 8 are padding, and are refused."""
    with pytest.raises(ValueError, match="block_m=8 needs swap=True"):
        KernelConfig(8, 64, 64, False)
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 8"):
        KernelConfig(4, 64, 64, True)
    with pytest.raises(ValueError, match="block_n1: expected a power of two >= 16"):
        KernelConfig(16, 8, 64, True)
    assert KernelConfig(8, 64, 64, True).block_m == 8


def test_split_k_configs_refuse_bad_counts():
    with pytest.raises(ValueError, match="split_k1"):
        KernelConfig(16, 64, 64, False, split_k1=3)
    with pytest.raises(ValueError, match="stream_k1: expected 0"):
        KernelConfig(16, 64, 64, False, stream_k1=5)
    with pytest.raises(ValueError, match="stream_k1: not with split_k1=2"):
        KernelConfig(16, 64, 64, False, stream_k1=1, split_k1=2)
    with pytest.raises(ValueError, match="stream_k1: not with split_k1=1 or tail_m=32"):
        KernelConfig(128, 64, 64, True, stream_k1=1, tail_m=32)
    with pytest.raises(ValueError, match="k_unroll: expected 2, 4 or 8"):
        KernelConfig(16, 64, 64, False, k_unroll=1)


def test_shared_output_no_limit_no_bias_fp32_and_fp16():
    spec, w = make(4, 2, 64, 96, "int4", bias=False, limit=None)
    moe = qmoe.MoE(spec, w, backend="triton")
    for dtype in (torch.float32, torch.float16):
        x, ids, tw = inputs(spec, 5, seed=9, dtype=dtype)
        shared = torch.randn(5, 64, device=DEVICE).to(dtype)
        out = moe.experts(x, ids, tw, shared_output=shared)
        assert out.dtype == dtype
        assert rel_err(out, reference_moe(spec, w, x, ids, tw, shared)) < TOL


def test_all_ids_dropped_gives_shared_output_exactly():
    spec, w = make(4, 2, 64, 64, "mxfp4")
    moe = qmoe.MoE(spec, w, backend="triton")
    x, _, tw = inputs(spec, 3, seed=1)
    ids = torch.full((3, 2), -1, dtype=torch.int32, device=DEVICE)
    shared = torch.randn(3, 64, device=DEVICE).to(torch.bfloat16)
    out = torch.full((3, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    moe.experts(x, ids, tw, out=out, shared_output=shared)
    assert torch.equal(out, shared)
    moe.experts(x, ids, tw, out=out)
    assert out.eq(0).all()


def test_deterministic():
    spec, w = make(4, 4, 96, 64, "nvfp4")
    moe = qmoe.MoE(spec, w, backend="triton")
    x, ids, tw = inputs(spec, 9, seed=3, drop=0.0)
    assert torch.equal(moe.experts(x, ids, tw), moe.experts(x, ids, tw))


def test_routing_through_moe_call():
    spec, w = make(8, 2, 64, 64, "mxfp4")
    moe = qmoe.MoE(spec, w, backend="triton")
    x = torch.randn(4, 64, device=DEVICE).to(torch.bfloat16)
    logits = torch.randn(4, 8, device=DEVICE)
    ids, tw = qmoe.route(spec, logits)
    assert rel_err(moe(x, logits), reference_moe(spec, w, x, ids, tw)) < TOL


def test_supports_reasons():
    b = get_backend("triton")
    spec = qmoe.presets["gpt-oss-20b"]
    assert not b.supports(spec, "bf16", DEVICE).ok
    assert "reference" in b.supports(spec, "bf16", DEVICE).reason


# ---- GPU: real preset shapes and CUDA graphs ---------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cfg", [
    KernelConfig(16, 64, 64, False, k_unroll=2, split_k=4, split_k1=2, direct=True, pdl=True, scale_words=True),
    KernelConfig(8, 64, 64, True, k_unroll=4, split_k=2, stream_k1=2, direct=True, pdl=True, scale_words=True)])
def test_split_k_and_scale_words_capture_and_replay_on_gpu(fmt, cfg):
    """The M=1 winners' shapes of configuration (GEMM1 in 2 parts or as stream-K on 2 programs per
    SM, GEMM2 in parts, scale words) under qmoe's capture recipe (warm-up on a side stream, capture
    on torch's capture stream): replays give the eager call's bits, the counters are back at 0
    after each, and the eager call agrees with the default configuration's (rel. 1e-2)."""
    from qmoe.kernels import moe as kmoe
    from qmoe.timing import capture_graph

    spec = qmoe.presets["gpt-oss-120b"] if fmt == "mxfp4" else qmoe.presets["qwen3-30b-a3b"]
    w = random_weights(spec, fmt, "cuda", seed=2)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    ids, tw = qmoe.route(spec, torch.randn(1, spec.num_experts, device="cuda", generator=g))
    eager = torch.empty(1, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    b.forward(prep, x, ids, tw, eager, config=cfg)
    base = torch.empty_like(eager)
    b.forward(prep, x, ids, tw, base, config=KernelConfig(16, 64, 64, False, scale_words=True))
    assert ((eager.float() - base.float()).norm() / base.float().norm()).item() < TOL
    out = torch.full_like(eager, float("nan"))
    graph = capture_graph(lambda: b.forward(prep, x, ids, tw, out, config=cfg))
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert not kmoe.split_counters(prep.meta["kernel_weights"], 1).any()


@gpu
@pytest.mark.gpu
def test_nvfp4_scale_codes_give_the_raw_scales_bits_on_gpu():
    """The GPU decode of scale codes (one integer instruction) against the raw E4M3 bytes' (about
    ten), qwen3-30b-a3b at decode and prefill sizes, a few zero-scale groups included: the same
    bits."""
    from qmoe.kernels.moe import fused_moe

    spec = qmoe.presets["qwen3-30b-a3b"]
    w = _zero_groups(random_weights(spec, "nvfp4", "cuda", seed=4))
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    kw = prep.meta["kernel_weights"]
    raw = _raw_nvfp4_twin(kw)
    act = spec.activation
    for M in (1, 64, 1024):
        x = torch.randn(M, spec.hidden_size, device="cuda").to(torch.bfloat16)
        ids, tw = qmoe.route(spec, torch.randn(M, spec.num_experts, device="cuda"))
        cfg = b.config_for(prep, M)
        outs = [fused_moe(x, ids, tw, weights, act.alpha, act.beta, act.limit, cfg,
                          torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda"))
                for weights in (kw, raw)]
        assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1]), f"M={M}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt-oss-120b", "deepseek-v4-flash", "kimi-k2.5", "qwen3-30b-a3b"])
def test_presets_on_gpu(name):
    spec = qmoe.presets[name]
    fmts = ("mxfp4", "nvfp4", "int4") if name == "qwen3-30b-a3b" else (qmoe.spec.PRESET_FORMATS[name],)
    for fmt in fmts:
        w = random_weights(spec, fmt, "cuda", seed=1, bias_std=0.5)
        moe = qmoe.MoE(spec, w, backend="triton")
        for M in (1, 3, 64, 1024):
            x = torch.randn(M, spec.hidden_size, device="cuda").to(torch.bfloat16)
            logits = torch.randn(M, spec.num_experts, device="cuda")
            ids, tw = qmoe.route(spec, logits)
            ids[0, 0] = -1
            out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
            moe.experts(x, ids, tw, out=out)
            assert torch.isfinite(out).all()
            err = rel_err(out, reference_moe(spec, w, x, ids, tw))
            assert err < TOL, f"{name} {fmt} M={M}: {err}"
        del w, moe
        torch.cuda.empty_cache()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 300, 2048])
def test_cuda_graph_replay_equals_eager(M):
    spec = dataclasses.replace(qmoe.presets["gpt-oss-20b"])
    w = random_weights(spec, "mxfp4", "cuda", seed=2, bias_std=0.5)
    moe = qmoe.MoE(spec, w, backend="triton", check_ids=False)
    x = torch.randn(M, spec.hidden_size, device="cuda").to(torch.bfloat16)
    logits = torch.randn(M, spec.num_experts, device="cuda")
    eager = moe(x, logits)
    out = torch.full_like(eager, float("nan"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe(x, logits, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(g):
        moe(x, logits, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # new inputs in the same buffers: the graph computes the new answer
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, moe(x, logits))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_large_scales_on_gpu(fmt):
    """Weights of std 50: mxfp4 scales above 2 take the two-multiply decode (fold off)."""
    spec = qmoe.presets["qwen3-30b-a3b"]
    w = random_weights(spec, fmt, "cuda", seed=3, weight_std=50.0, bias_std=0.5)
    moe = qmoe.MoE(spec, w, backend="triton")
    kw = moe.plan.prepared["triton"].meta["kernel_weights"]
    assert (kw.fold13, kw.fold2) == ((False, False) if fmt == "mxfp4" else (True, True))
    for M in (1, 64):
        x = torch.randn(M, spec.hidden_size, device="cuda").to(torch.bfloat16)
        ids, tw = qmoe.route(spec, torch.randn(M, spec.num_experts, device="cuda"))
        out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
        moe.experts(x, ids, tw, out=out)
        err = rel_err(out, reference_moe(spec, w, x, ids, tw))
        assert err < TOL, f"{fmt} M={M}: {err}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cfg", [KernelConfig(16, 32, 32, True, k_unroll=2),
                                 KernelConfig(64, 32, 64, True, k_unroll=2, scale_words=True),
                                 KernelConfig(16, 32, 32, True, k_unroll=8),
                                 KernelConfig(8, 32, 32, True, k_unroll=2, scale_words=True),
                                 KernelConfig(8, 32, 64, True, k_unroll=4, direct=True)])
def test_weight_first_matches_reference(fmt, cfg):
    """The weight as the MMA's first operand (swap; nvfp4: one MMA per quad of K, the masked
    remainder past H too) for every format. H = 160 leaves a masked remainder in GEMM1
    (mxfp4, int4: 2 whole chunks and a half one; nvfp4: 5 chunks, a half one); k_unroll 8 leaves
    both GEMMs' chunks to the loops past the unrolled one (GEMM2's quads included). 8-row blocks:
    18 slots over 4 experts, several blocks per expert, grouped by the grouping kernels and
    inside the GEMMs (direct)."""
    spec, w = make(4, 2, 160, 96, fmt, seed=13)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    x, ids, tw = inputs(spec, 9, seed=6)
    out = torch.full((9, 160), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    b.forward(prep, x, ids, tw, out, config=cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference_moe(spec, w, x, ids, tw)) < TOL


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cfg", [KernelConfig(8, 32, 32, True, k_unroll=2, scale_words=True, direct=True),
                                 KernelConfig(64, 32, 64, True, k_unroll=2, scale_words=True),
                                 KernelConfig(16, 32, 32, False, k_unroll=4)])
def test_whole_k_gives_the_remainder_loops_bits(fmt, cfg):
    """whole_k: GEMM1's unrolled loop over every K chunk, x masked at H, in place of the remainder
    loop after it. H = 160 pads to 256 (mxfp4, int4: 4 chunks, the third past H in part, the fourth
    padding; nvfp4: 8 chunks, one MMA per quad in both loops): the same MMA steps in the same order,
    so the same bits."""
    spec, w = make(4, 2, 160, 96, fmt, seed=19)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    x, ids, tw = inputs(spec, 9, seed=9)
    outs = []
    for c in (cfg, dataclasses.replace(cfg, whole_k=True)):
        out = torch.full((9, 160), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        b.forward(prep, x, ids, tw, out, config=c)
        outs.append(out)
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], reference_moe(spec, w, x, ids, tw)) < TOL


def test_whole_k_refuses_a_k_of_no_whole_iterations():
    spec, w = make(4, 2, 160, 96, "mxfp4")
    prep = get_backend("triton").prepare(spec, w)
    cfg = KernelConfig(16, 32, 32, False, k_unroll=8, whole_k=True)   # 4 chunks of mxfp4
    assert "whole_k" in cfg.problem_with("mxfp4", 256, 128)
    with pytest.raises(ValueError, match="whole_k"):
        x, ids, tw = inputs(spec, 2, seed=1)
        get_backend("triton").forward(prep, x, ids, tw, torch.empty(2, 160, dtype=torch.bfloat16, device=DEVICE),
                                      config=cfg)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name, fmt", [("gpt-oss-120b", "mxfp4"), ("qwen3-30b-a3b", "nvfp4"), ("qwen3-30b-a3b", "int4")])
def test_weight_first_on_gpu(name, fmt):
    """The weight-first (swap) configurations the tuner tries, on preset shapes (wgmma with the
    decoded weight as its register operand; nvfp4 one MMA per quad of K; gpt-oss's H = 2880 leaves
    a remainder past the unrolled loop): the reference's answer, and the same bits twice and with
    whole_k (no remainder loop; for qwen3's 2048 only the x mask in the loop)."""
    spec = qmoe.presets[name]
    w = random_weights(spec, fmt, "cuda", seed=5, bias_std=0.5)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    cfgs = [KernelConfig(bm, bn, bn, True, nw, 3, 2, scale_words=True)
            for bm, bn, nw in ((128, 128, 8), (128, 64, 4), (64, 128, 8), (64, 64, 4), (32, 64, 4), (8, 64, 4),
                               (8, 128, 4))]
    for M in (64, 1500):
        g = torch.Generator(device="cuda").manual_seed(M)
        x = torch.randn(M, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
        ids, tw = qmoe.route(spec, torch.randn(M, spec.num_experts, device="cuda", generator=g))
        ref = reference_moe(spec, w, x, ids, tw)
        for cfg in cfgs:
            outs = []
            for c in (cfg, cfg, dataclasses.replace(cfg, whole_k=True)):
                out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
                b.forward(prep, x, ids, tw, out, config=c)
                outs.append(out)
            assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1]), f"{cfg} M={M}"
            assert torch.equal(outs[0], outs[2]), f"{cfg} M={M}, whole_k"
            err = rel_err(outs[0], ref)
            assert err < TOL, f"{name} {fmt} {cfg} M={M}: {err}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cfg", [KernelConfig(32, 32, 32, False, k_unroll=2, tail_m=16),
                                 KernelConfig(64, 32, 64, True, k_unroll=2, scale_words=True, tail_m=16)])
def test_tail_blocks_match_reference(fmt, cfg):
    """Tail blocks (tail_m = 16): experts of 20, 10, 70 and 0 slots; at both block sizes (32 and
    64 rows) the expert of 10 and the last 6 of the 70 go to tail blocks, the rest to full blocks;
    the output is the reference's, every row written."""
    spec, w = make(4, 2, 64, 96, fmt, seed=17)
    x, _, tw = inputs(spec, 50, seed=9, drop=0.0)
    slots = torch.tensor([0] * 20 + [1] * 10 + [2] * 70, dtype=torch.int32)
    ids = slots[torch.randperm(100, generator=torch.Generator().manual_seed(3))].reshape(50, 2).to(DEVICE)
    grp = km.group_tokens(ids, 4, cfg.block_m, tail_m=cfg.tail_m)
    assert int((grp.block_expert[grp.num_blocks:] >= 0).sum()) == 2   # the case meets tail blocks
    b = get_backend("triton")
    out = torch.full((50, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    b.forward(b.prepare(spec, w), x, ids, tw, out, config=cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference_moe(spec, w, x, ids, tw)) < TOL


@pytest.mark.parametrize("kw, why", [(dict(block_m=64, tail_m=16), "swap"), (dict(block_m=32, tail_m=32), "tail_m"),
                                     (dict(block_m=64, swap=True, tail_m=48), "tail_m"),
                                     (dict(block_m=32, tail_m=16, split_k1=2), "split_k1")])
def test_tail_blocks_refuse_what_would_change_bits(kw, why):
    """A slot may land in a tail block in one run and a full one in the next (atomics rank the
    slots), so both must give it the same bits: 64-row blocks with the weight second (wgmma)
    against 16-row tails (mma.sync) are refused."""
    with pytest.raises(ValueError, match=why):
        KernelConfig(**kw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name, fmt", [("gpt-oss-120b", "mxfp4"), ("qwen3-30b-a3b", "nvfp4"), ("qwen3-30b-a3b", "int4")])
def test_tail_blocks_on_gpu(name, fmt):
    """Weight-first configurations with tail blocks, at M = 1500 for gpt-oss and 1000 for qwen3
    (experts of 47 +- 7 and 62 +- 8 slots: tail blocks at every block size): the same bits as
    the configuration without them (the rows of tail blocks, computed at tail_m rows, equal those
    at block_m rows), the same bits twice, and the reference's answer."""
    spec = qmoe.presets[name]
    w = random_weights(spec, fmt, "cuda", seed=7, bias_std=0.5)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    M = 1500 if name == "gpt-oss-120b" else 1000
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    ids, tw = qmoe.route(spec, torch.randn(M, spec.num_experts, device="cuda", generator=g))
    ref = reference_moe(spec, w, x, ids, tw)
    for bm, tm in ((128, 64), (64, 32), (32, 16)):
        cfg = KernelConfig(bm, 64, 64, True, 4, 3, 2, scale_words=True)
        outs = []
        for c in (cfg, dataclasses.replace(cfg, tail_m=tm), dataclasses.replace(cfg, tail_m=tm)):
            out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
            b.forward(prep, x, ids, tw, out, config=c)
            outs.append(out)
        grp = km.group_tokens(ids, spec.num_experts, bm, tail_m=tm)
        tails = int((grp.parts()[1][2] >= 0).sum())
        assert tails > 0, f"{bm}/{tm}: no tail blocks"   # their rows, computed at tm rows, are compared
        assert torch.isfinite(outs[1]).all()
        assert torch.equal(outs[1], outs[2]), f"{name} {fmt} {bm}/{tm}: two runs differ"
        assert torch.equal(outs[0], outs[1]), f"{name} {fmt} {bm}/{tm}: tail blocks change bits"
        assert rel_err(outs[1], ref) < TOL


# --- nothing silently wrong: NaN in, NaN out; bad ids never go out of bounds ----------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", ["input", "scale"])
@pytest.mark.parametrize("limit", [7.0, None])
def test_nan_propagates_like_the_reference(fmt, where, limit):
    """A NaN input or a NaN weight block must come out NaN, with and without the SwiGLU limit
    (tl.minimum / tl.maximum drop NaN by default: tl.minimum(nan, 7) gave 7.0 on an H200)."""
    from qmoe.cli.check.cases import with_nan_block

    spec, w = make(4, 2, 64, 64, fmt, limit=limit, seed=11)
    x, ids, tw = inputs(spec, 4, seed=3, drop=0.0)
    if where == "input":
        x[1, 5] = float("nan")
        nan_rows = torch.tensor([False, True, False, False])
    else:
        w = with_nan_block(w, expert=2)
        ids[2] = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
        nan_rows = (ids == 2).any(dim=1).cpu()
    ref = reference_moe(spec, w, x, ids, tw)
    assert torch.equal(torch.isnan(ref).all(dim=1).cpu(), nan_rows)
    out = qmoe.MoE(spec, w, backend="triton").experts(x, ids, tw)
    assert torch.equal(torch.isnan(out).all(dim=1).cpu(), nan_rows)
    assert torch.isfinite(out[~nan_rows.to(DEVICE)]).all()


@pytest.mark.parametrize("check_ids", [True, False])
def test_out_of_range_ids_poison_their_row_without_going_out_of_bounds(check_ids):
    """Ids >= E (or < -1) are dropped by the grouping and NaN their token's row inside the
    combine kernel: no host sync, also with check_ids=False and during graph capture."""
    spec, w = make(4, 2, 64, 64, "mxfp4", seed=2)
    x, ids, tw = inputs(spec, 5, seed=4, drop=0.0)
    bad = ids.clone()
    bad[1, 0] = 4         # == E
    bad[3, 1] = 1 << 20   # far past E
    bad[4, 0] = -7
    moe = qmoe.MoE(spec, w, backend="triton", check_ids=check_ids)
    out = moe.experts(x, bad, tw)
    rows = torch.isnan(out).all(dim=1).cpu().tolist()
    assert rows == [False, True, False, True, True]
    good = moe.experts(x, ids, tw)
    assert torch.equal(out[0], good[0]) and torch.equal(out[2], good[2])


def test_default_kernel_config_is_valid_for_every_format():
    spec, _ = make(4, 2, 64, 64, "mxfp4")
    for fmt in FORMATS:
        assert KernelConfig().problem_with(fmt, 128, 128) is None, fmt
        _, w = make(4, 2, 64, 64, fmt)
        b = get_backend("triton")
        x, ids, tw = inputs(spec, 3, seed=1)
        out = b.forward(b.prepare(spec, w), x, ids, tw, torch.empty_like(x), config=KernelConfig())
        assert rel_err(out, reference_moe(spec, w, x, ids, tw)) < TOL


# --- grouping inside the GEMMs (direct=True): no grouping launch at decode ------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M,k,E,bm", [(1, 4, 8, 16), (3, 2, 4, 16), (5, 4, 4, 16), (9, 3, 4, 16), (20, 2, 6, 16)])
def test_direct_grouping_matches_the_grouping_kernels(fmt, M, k, E, bm):
    """Experts with more slots than block_m (M=9, 20 over 4-6 experts) take several blocks; ids
    of -1 and a token naming one expert twice are covered. Bitwise equal to the grouped path:
    the grouping only chooses which program computes a row, never the row's arithmetic."""
    spec, w = make(E, k, 64, 64, fmt, seed=M + k)
    x, ids, tw = inputs(spec, M, seed=M, drop=0.2)
    ids[0, :] = ids[0, 0]  # one token names the same expert k times
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    grouped = b.forward(prep, x, ids, tw, torch.full_like(x, float("nan")), config=KernelConfig(bm, 32, 32))
    direct = b.forward(prep, x, ids, tw, torch.full_like(x, float("nan")),
                       config=KernelConfig(bm, 32, 32, direct=True))
    assert torch.isfinite(direct).all()
    assert torch.equal(direct, grouped)
    assert rel_err(direct, reference_moe(spec, w, x, ids, tw)) < TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_y_bf16_rounds_each_slot_row_once(fmt):
    """KernelConfig.y_bf16 (the slots' rows of y in bf16): within the tolerance of the float64
    reference, at most one bf16 rounding per slot away from the fp32 path (the interpreter
    truncates fp32 -> bf16: 2^-7 of each row at most), deterministic, with a shared output and
    tail blocks; refused with split-K."""
    spec, w = make(6, 3, 160, 96, fmt, seed=31)
    b = get_backend("triton")
    prep = b.prepare(spec, w)
    x, ids, tw = inputs(spec, 9, seed=5, drop=0.1)
    shared = torch.randn(9, 160, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEVICE)
    cfg = KernelConfig(32, 32, 32, True, k_unroll=2, tail_m=16)
    outs = []
    for c in (cfg, dataclasses.replace(cfg, y_bf16=True), dataclasses.replace(cfg, y_bf16=True)):
        out = torch.full((9, 160), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        outs.append(b.forward(prep, x, ids, tw, out, shared_output=shared, config=c))
    ref = reference_moe(spec, w, x, ids, tw) + shared.double()
    assert rel_err(outs[1], ref) < TOL and torch.equal(outs[1], outs[2])
    assert 0 < rel_err(outs[1], outs[0].double()) < 2 ** -7
    with pytest.raises(ValueError, match="y_bf16"):
        KernelConfig(16, 64, 64, split_k=2, y_bf16=True)


def test_direct_grouping_poisons_bad_ids_too():
    spec, w = make(4, 2, 64, 64, "int4", seed=5)
    x, ids, tw = inputs(spec, 3, seed=1, drop=0.0)
    ids[1, 1] = 7
    b = get_backend("triton")
    out = b.forward(b.prepare(spec, w), x, ids, tw, torch.empty_like(x), config=KernelConfig(direct=True))
    assert torch.isnan(out).all(dim=1).tolist() == [False, True, False]


# --- batch invariance: a token's row does not depend on the batch it is in -------------------------
@pytest.fixture
def batch_invariant():
    """The triton backend switched to batch invariance for one test (the switch is off by default)."""
    b = get_backend("triton")
    before, b.batch_invariant = b.batch_invariant, True
    yield
    b.batch_invariant = before


def test_batch_invariance_is_a_switch_off_by_default():
    assert get_backend("triton").batch_invariant is False


def test_the_invariant_backend_object_the_commands_take():
    """`--backend qmoe.backends.triton:INVARIANT` (the commands' module:attr names) is the backend
    in batch-invariant mode: its plan runs only invariant configurations, the default object stays
    off, and qmoe check's invariance case passes with the property required."""
    from qmoe.backends.triton import configs
    from qmoe.cli import check
    from qmoe.cli.common import load_backend

    b = load_backend("qmoe.backends.triton:INVARIANT")
    assert b.batch_invariant and not get_backend("triton").batch_invariant
    spec, w = make(8, 2, 64, 96, "mxfp4", seed=21)
    prep = b.prepare(spec, w)
    assert prep.meta["batch_invariant"]
    assert all(configs.invariant(b.config_for(prep, m)) for m in (1, 16, 64, 1024, 8192))
    case = {"id": "invariance M<=16", "M": 16, "neg_ids": False, "shared": False, "kind": "invariant",
            "nan": None, "sizes": [1, 3, 16]}
    r = check.run_case(b, prep, spec, w, case, seed=4, tolerance=check.TOLERANCES["mxfp4"], require=("invariant",))
    assert r["status"] == "pass", r
    name = "qmoe.backends.triton:INVARIANT"   # MoE (and so qmoe bench) takes the name too
    moe = qmoe.MoE(spec, w, backend=name)
    assert moe.plan.prepared[name].meta["batch_invariant"] and moe.plan.backend_for(5) == name
    x, ids, tw = inputs(spec, 5, seed=2)
    assert torch.equal(moe.experts(x, ids, tw), b.forward(prep, x, ids, tw, torch.empty_like(x)))
    with pytest.raises(ValueError, match="cannot load 'qmoe.backends.triton:NOPE'"):
        get_backend("qmoe.backends.triton:NOPE")



@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_of_a_batch_equal_the_same_tokens_alone(fmt, batch_invariant):
    """Through MoE with the triton backend switched to batch invariance: the configurations chosen
    for 1, 3, 16 and 64 tokens differ (the weight first in direct 16-row blocks and grouped 32-row
    blocks), yet every row is bitwise the same."""
    spec, w = make(8, 2, 64, 96, fmt, seed=21)
    x, ids, tw = inputs(spec, 64, seed=9, drop=0.1)
    moe = qmoe.MoE(spec, w, backend="triton")
    full = moe.experts(x, ids, tw)
    seen = {moe.plan.prepared["triton"].meta["batch_invariant"]}
    for m in (1, 3, 16):
        part = moe.experts(x[:m].contiguous(), ids[:m].contiguous(), tw[:m].contiguous())
        assert torch.equal(part, full[:m]), f"M={m}"
    b = get_backend("triton")
    cfgs = {b.config_for(moe.plan.prepared["triton"], m) for m in (1, 3, 16, 64)}
    assert seen == {True} and len(cfgs) >= 2  # several configurations really ran


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name,fmt", [("gpt-oss-120b", "mxfp4"), ("kimi-k2.5", "int4"), ("qwen3-30b-a3b", "nvfp4")])
def test_batch_invariance_on_gpu(name, fmt, batch_invariant):
    """Prefixes of 4096 tokens at M in {1, 2, 3, 4, 8, 16, 64, 256, 1024, 4096}: every row equal,
    bitwise, to the same token in the batch of 4096 (issue 12), with the switch on."""
    spec = qmoe.presets[name]
    w = random_weights(spec, fmt, "cuda")
    moe = qmoe.MoE(spec, w, backend="triton")
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(4096, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    ids, tw = qmoe.route(spec, torch.randn(4096, spec.num_experts, device="cuda", generator=g))
    full = moe.experts(x, ids, tw)
    differ = {}
    for m in (1, 2, 3, 4, 8, 16, 64, 256, 1024):
        part = moe.experts(x[:m].contiguous(), ids[:m].contiguous(), tw[:m].contiguous())
        n = int((part.view(torch.int16) != full[:m].view(torch.int16)).any(dim=1).sum())
        if n:
            differ[m] = n
    assert differ == {}, f"rows differing from the batch of 4096: {differ}"
