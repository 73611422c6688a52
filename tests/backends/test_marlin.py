"""The marlin backend (vLLM's Marlin MoE ops) against a fake op library on the CPU, and on a GPU
with vLLM's real `_moe_C` library (marked gpu)."""

import dataclasses
import functools
import os
import time

import pytest
import torch

import qmoe
import vllm_moe_fake as vf
from conftest import moe_inputs, random_weights, rel_err, small_spec
from qmoe.backends import _vllm_ops
from qmoe.backends import marlin
from qmoe.backends.marlin import BACKEND, MarlinBackend
from qmoe.backends.reference import reference_moe
from qmoe.formats._fp4 import unpack_nibbles
from qmoe.timing import capture_graph

FORMATS = ("mxfp4", "int4", "nvfp4")
SPEC = small_spec(E=4, k=2, H=160, I=96)  # H and I off the tiles: both get padded (192, 128)


@pytest.fixture
def fake(monkeypatch):
    """The fake op library, registered fresh, with the backend pointed at it on a pretend SM90."""
    f = vf.install()
    monkeypatch.setattr(marlin, "_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(BACKEND, "ops_namespace", f.namespace)
    yield f
    f.uninstall()


@pytest.fixture(scope="module", params=FORMATS)
def fmt_weights(request):
    return request.param, random_weights(SPEC, request.param, seed=1)


def run(spec, weights, M=6, seed=0, backend=BACKEND):
    prepared = backend.prepare(spec, weights)
    x, ids, w = moe_inputs(spec, M, seed)
    out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16)
    assert backend.forward(prepared, x, ids, w, out) is out
    return out, rel_err(out, spec, weights, x, ids, w), prepared


# ---- declared capabilities and reasons ---------------------------------------------------------

def test_registry_and_declarations():
    assert qmoe.backends.get_backend("marlin") is BACKEND
    assert BACKEND.name == "marlin" and BACKEND.formats == ("mxfp4", "nvfp4", "int4")
    assert BACKEND.capturable and not BACKEND.tunable
    assert "precompiled" in BACKEND.first_use  # nothing is compiled at first use


def test_scalar_type_ids_are_vllms():
    # vllm/scalar_type.py ids (also the template arguments of the kernels in _moe_C)
    assert _vllm_ops.UINT4B8 == 1125899907892224
    assert _vllm_ops.FLOAT4_E2M1F == 562949953487106
    assert _vllm_ops.UINT4 == 1125899906843648
    assert _vllm_ops.FLOAT8_E4M3FN == 2814749767172868


def test_no_gpu_reason():
    sup = BACKEND.supports(SPEC, "mxfp4", "cpu")
    assert not sup.ok and "needs a CUDA GPU" in sup.reason


def test_old_gpu_reason(monkeypatch):
    monkeypatch.setattr(marlin, "_device_capability", lambda device: (7, 5))
    sup = BACKEND.supports(SPEC, "int4", "cuda")
    assert not sup.ok and sup.reason == "Marlin needs SM80 or newer; this GPU is SM75"


def test_format_not_offered(fake):
    sup = BACKEND.supports(SPEC, "bf16", "cpu")
    assert not sup.ok and "not offered" in sup.reason and "bf16" in sup.reason  # the base class's words


def test_too_many_experts(fake):
    sup = BACKEND.supports(dataclasses.replace(SPEC, num_experts=992), "int4", "cpu")
    assert not sup.ok and "at most 991 experts" in sup.reason


def test_vllm_not_installed(monkeypatch):
    monkeypatch.setattr(marlin, "_device_capability", lambda device: (9, 0))
    b = MarlinBackend(ops_namespace="qmoe_nothing_here_1", ops_package="qmoe_no_such_package")
    sup = b.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok
    assert sup.reason.startswith("qmoe_no_such_package is not installed: pip install vllm")


def test_library_that_fails_to_load(tmp_path, monkeypatch):
    pkg = tmp_path / "qmoe_broken_vllm"  # a namespace package holding only the library, like .peers/vllm
    pkg.mkdir()
    (pkg / "_moe_C_stable_libtorch.abi3.so").write_bytes(b"not an ELF file")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _vllm_ops.find_libraries("qmoe_broken_vllm")[0] == [str(pkg / "_moe_C_stable_libtorch.abi3.so")]
    ops, why = _vllm_ops.load("qmoe_nothing_here_2", "qmoe_broken_vllm")
    assert ops is None
    assert "vLLM's MoE op library failed to load (_moe_C_stable_libtorch.abi3.so: OSError:" in why
    assert "torch compatible" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real library loads on a GPU machine")
def test_real_library_on_a_machine_without_cuda(monkeypatch):
    peers = os.path.join(os.path.dirname(__file__), "..", "..", ".peers")
    if not os.path.exists(os.path.join(peers, "vllm", "_moe_C_stable_libtorch.abi3.so")):
        pytest.skip("vLLM's _moe_C library is not carried here (.peers/vllm)")
    monkeypatch.syspath_prepend(peers)
    ops, why = _vllm_ops.load("qmoe_nothing_here_3", "vllm")
    assert ops is None and "failed to load" in why and "cannot open shared object file" in why


def test_op_missing():
    f = vf.install({k: vf.SCHEMAS[k] for k in ("moe_align_block_size", "moe_sum")})
    try:
        ops, why = _vllm_ops.load(f.namespace, "qmoe_no_such_package")
        assert ops is None and "lack moe_wna16_marlin_gemm" in why and "vLLM 0.33" in why
    finally:
        f.uninstall()


def test_schema_changed():
    f = vf.install({**vf.SCHEMAS, "moe_wna16_marlin_gemm": vf.OLD_MARLIN_SCHEMA})
    try:
        ops, why = _vllm_ops.load(f.namespace, "qmoe_no_such_package")
        assert ops is None and why.startswith("vLLM's moe_wna16_marlin_gemm schema changed (")
        assert "no argument 'a_scales'" in why and "no argument 'b_type_id'" in why
        assert "new required argument(s) g_idx_or_none, perm_or_none, is_ep, b_q_type_id, is_full_k" in why
    finally:
        f.uninstall()


def test_supported_with_the_fake(fake):
    sup = BACKEND.supports(SPEC, "nvfp4", "cpu")
    assert sup.ok and "Marlin MoE" in sup.reason and "SM90" in sup.reason


# ---- sizes -------------------------------------------------------------------------------------

def _tiles_ok(n, k):
    return (n % 64 == 0 and k % 128 == 0) or (n % 128 == 0 and k % 64 == 0)


def test_padded_sizes_of_the_presets():
    assert marlin.padded_sizes(2880, 2880) == (2880, 2944)        # gpt-oss: I padded, not H
    assert marlin.padded_sizes(2880, 2880, pad_like_vllm=True) == (3072, 2944)  # vLLM's MXFP4 rule
    for name in ("kimi-k2.5", "qwen3-30b-a3b", "deepseek-v4-flash", "deepseek-v3"):
        s = qmoe.presets[name]
        assert marlin.padded_sizes(s.hidden_size, s.intermediate_size) == (s.hidden_size, s.intermediate_size)


@pytest.mark.parametrize("H", range(32, 513, 32))
def test_padded_sizes_are_minimal(H):
    for I in range(32, 513, 32):
        Hp, Ip = marlin.padded_sizes(H, I)
        assert _tiles_ok(2 * Ip, Hp) and _tiles_ok(Hp, Ip), (H, I, Hp, Ip)
        best = min(h * i for h in range(H, H + 257, 32) for i in range(I, I + 257, 32)
                   if _tiles_ok(2 * i, h) and _tiles_ok(h, i))
        assert Hp * Ip == best, (H, I, Hp, Ip)


def test_block_size_rule():
    # vLLM: the first of 8/16/32/48/64 with M * k / E / block < 0.9, else 64
    assert marlin.block_size_m(1, 8, 384) == 8
    assert marlin.block_size_m(64, 8, 384) == 8          # 1.33 per expert
    assert marlin.block_size_m(1024, 8, 384) == 32       # 21.3: 21.3/16 > 0.9, 21.3/32 < 0.9
    assert marlin.block_size_m(1024, 4, 128) == 48       # 32: 32/32 > 0.9, 32/48 < 0.9
    assert marlin.block_size_m(8192, 8, 128) == 64


def test_align_sizes_match_vllm():
    assert _vllm_ops.align_sizes(8, 385, 8) == (64, 8)     # fewer slots than experts: slots x block
    assert _vllm_ops.align_sizes(8192, 385, 32) == (8192 + 385 * 31, -(-(8192 + 385 * 31) // 32))


# ---- transforms and their inverses -------------------------------------------------------------

def test_tiles_round_trip_and_match_the_fake_decoder():
    data = torch.randint(0, 256, (3, 192, 64), dtype=torch.uint8)  # N = 192, K = 128
    tiles = marlin.marlin_tiles(data)
    assert tiles.dtype == torch.int32 and tiles.shape == (3, 8, 384)
    assert torch.equal(marlin.marlin_untiles(tiles), data)
    for e in range(3):  # the fake decodes the layout from its facts, independently
        assert torch.equal(vf.decode_codes(tiles[e]), unpack_nibbles(data[e]).T)


@pytest.mark.parametrize("fp4", [False, True])
def test_scales_round_trip(fp4):
    s = torch.randint(0, 256, (2, 128, 6), dtype=torch.uint8)
    m = marlin.marlin_scales(s, fp4)
    assert m.shape == (2, 6, 128) and torch.equal(marlin.marlin_unscales(m, fp4), s)
    assert torch.equal(vf.decode_columns(m, fp4).transpose(1, 2), s)
    assert not torch.equal(m, s.transpose(1, 2))  # it does move columns


def test_bias_round_trip():
    b = torch.randn(3, 96)
    m = marlin.marlin_bias(b)
    assert torch.equal(marlin.marlin_unbias(m), b) and torch.equal(vf.decode_bias(m), b)
    assert not torch.equal(m, b)


def test_uint4b8_is_code_plus_8():
    data = torch.arange(256, dtype=torch.uint8)
    u = marlin.int4_to_uint4b8(data)
    signed = lambda c: torch.where(c >= 8, c.int() - 16, c.int())  # noqa: E731
    assert torch.equal((u & 0xF).int() - 8, signed(data & 0xF)) and torch.equal((u >> 4).int() - 8, signed(data >> 4))
    assert torch.equal(marlin.uint4b8_to_int4(u), data)


def test_nvfp4_scales_round_trip():
    s = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(1, 127)  # every s >= 0
    x = marlin.nvfp4_scale_exponent(s)
    assert x == 0  # the largest is 448
    m = marlin.nvfp4_marlin_scales(s, x)
    back = marlin.nvfp4_unmarlin_scales(m, x)
    kept = s.float() * 2 ** 7 >= 2  # vLLM flushes scales below 2^-6 to 0
    assert torch.equal(back.float()[kept], s.float()[kept]) and (back.float()[~kept] == 0).all()
    assert int(kept.sum()) == 127 - 8  # the 7 subnormals and zero
    # S0E5M3: the top bit of every stored nonzero scale is set
    assert ((m.view(torch.uint8)[kept] & 0x80) != 0).all()
    small = (s.float() / 64).to(torch.float8_e4m3fn)
    assert marlin.nvfp4_scale_exponent(small) == 6  # largest 7: lifted by 2^6 into [224, 448]
    g = torch.tensor([1e-3, 0.5])
    assert torch.equal(marlin.nvfp4_unmarlin_global(marlin.nvfp4_marlin_global(g, 6), 6), g)


def test_pad_parts_round_trip():
    t = torch.randn(2, 2 * 96, 5)
    p = marlin.pad_parts(t, 1, 128, parts=2)
    assert p.shape == (2, 256, 5) and not p[:, 96:128].any() and not p[:, 224:].any()
    assert torch.equal(marlin.unpad_parts(p, 1, 96, parts=2), t)
    e8 = torch.randint(0, 255, (2, 64, 3), dtype=torch.uint8).view(torch.float8_e8m0fnu)
    pe = marlin.pad_parts(e8, 2, 4)  # zero bytes on any dtype
    assert (pe.view(torch.uint8)[..., 3:] == 0).all() and torch.equal(marlin.unpad_parts(pe, 2, 3), e8)


def test_prepared_weights_invert_to_the_canonical_bytes(fake, fmt_weights):
    fmt, w = fmt_weights
    p = BACKEND.prepare(SPEC, w)
    t, m = p.tensors, p.meta
    I, Ip, H, Hp = SPEC.intermediate_size, m["intermediate_padded"], SPEC.hidden_size, m["hidden_padded"]
    assert (Hp, Ip) == (192, 128)
    back13 = marlin.unpad_parts(marlin.unpad_parts(marlin.marlin_untiles(t["w13"]), 1, I, 2), 2, H // 2)
    back2 = marlin.unpad_parts(marlin.unpad_parts(marlin.marlin_untiles(t["w2"]), 1, H), 2, I // 2)
    if fmt == "int4":
        back13, back2 = marlin.uint4b8_to_int4(back13), marlin.uint4b8_to_int4(back2)
    assert torch.equal(back13, w.w13.data) and torch.equal(back2, w.w2.data)
    s13 = marlin.marlin_unscales(t["s13"], fmt != "int4")
    if fmt == "nvfp4":
        x13, _ = m["nvfp4_exponents"]
        s13 = marlin.nvfp4_unmarlin_scales(s13, x13)
        assert torch.equal(marlin.nvfp4_unmarlin_global(t["g13"], x13), w.w13.global_scale)
    s13 = marlin.unpad_parts(marlin.unpad_parts(s13, 1, I, 2), 2, H // qmoe.formats.block_size(fmt))
    assert torch.equal(s13.view(torch.uint8), w.w13.scales.view(torch.uint8))
    b13 = marlin.unpad_parts(marlin.marlin_unbias(t["b13"]), 1, I, 2)
    assert torch.equal(b13, w.b13.to(torch.bfloat16))


# ---- forward against the reference -------------------------------------------------------------

def test_matches_reference(fake, fmt_weights):
    fmt, w = fmt_weights
    out, err, prepared = run(SPEC, w)
    assert err < 1e-2, (fmt, err)
    names = [c[0] for c in fake.calls]
    assert names == ["moe_align_block_size", "moe_wna16_marlin_gemm", "moe_wna16_marlin_gemm", "moe_sum"]
    g1, g2 = fake.calls[1][1], fake.calls[2][1]
    assert (g1["top_k"], g1["mul"], g1["size"]) == (2, False, (6, 256, 192))
    assert (g2["top_k"], g2["mul"], g2["size"]) == (1, True, (12, 192, 128))
    assert g1["fp32_reduce"] and not g1["atomic"] and g1["bias"] and g2["bias"]
    assert fake.calls[3][1] == {"topk_ids": True, "expert_map": True}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H, I", [(128, 64), (256, 128), (64, 160)])
def test_shapes_and_plain_silu(fake, fmt, H, I):
    spec = small_spec(E=5, k=3, H=H, I=I, bias=False, activation=qmoe.SwiGLU())
    w = random_weights(spec, fmt, seed=2)
    out, err, prepared = run(spec, w, M=9)
    assert err < 1e-2 and "b13" not in prepared.tensors
    assert not fake.calls[1][1]["bias"]


@pytest.mark.parametrize("M", [1, 3, 40, 200])
def test_block_sizes(fake, M):
    w = random_weights(SPEC, "mxfp4", seed=3)
    _, err, _ = run(SPEC, w, M=M, seed=M)
    assert err < 1e-2
    assert fake.calls[0][1]["block_size"] == marlin.block_size_m(M, SPEC.top_k, SPEC.num_experts)


def test_missing_experts_contribute_nothing(fake, fmt_weights):
    fmt, w = fmt_weights
    prepared = BACKEND.prepare(SPEC, w)
    x, ids, tw = moe_inputs(SPEC, 5, seed=4)
    ids[1, 0] = -1  # expert not on this rank
    ids[3] = -1     # a token with no expert at all
    shared = torch.randn(5, SPEC.hidden_size)
    out = torch.full((5, SPEC.hidden_size), float("nan"), dtype=torch.bfloat16)
    BACKEND.forward(prepared, x, ids, tw, out, shared_output=shared)
    assert torch.isfinite(out).all()  # the fake leaves NaN in every row the kernel does not write
    assert rel_err(out, SPEC, w, x, ids, tw, shared=shared) < 1e-2
    assert torch.equal(out[3], shared[3].to(torch.bfloat16))
    assert fake.calls[0][1] == {"block_size": 8, "num_experts": SPEC.num_experts + 1, "expert_map": True}


def test_a_raw_minus_one_is_out_of_bounds_for_the_align_op(fake):
    """Why the expert map carries a guard word before it: moe_align_block_size reads an id as an
    index, so -1 reads the word before the map (or, without a map, counts expert -1)."""
    ops, _ = _vllm_ops.load(fake.namespace)
    ids = torch.tensor([[0, -1]], dtype=torch.int32)
    buf = [torch.empty(n, dtype=torch.int32) for n in (*_vllm_ops.align_sizes(2, 4, 8), 1)]
    with pytest.raises(RuntimeError, match="out of bounds"):
        ops.moe_align_block_size(ids, 4, 8, *buf, expert_map=torch.arange(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of bounds"):
        ops.moe_align_block_size(ids, 4, 8, *buf, expert_map=None)
    guarded = torch.tensor([-1, 0, 1, 2, 3], dtype=torch.int32)[1:]
    ops.moe_align_block_size(ids, 4, 8, *buf, expert_map=guarded)
    assert buf[0][:8].tolist() == [0] + [2] * 7  # slot 0 (expert 0) placed, slot 1 (id -1) nowhere
    assert buf[2].item() == 8


def test_prepared_expert_map_has_its_guard_word(fake, fmt_weights):
    _, w = fmt_weights
    emap = BACKEND.prepare(SPEC, w).tensors["expert_map"]
    E = SPEC.num_experts
    assert emap.tolist() == [-1, *range(E), -1]


def test_zero_tokens_return_out_untouched(fake, fmt_weights):
    _, w = fmt_weights
    prepared = BACKEND.prepare(SPEC, w)
    out = torch.full((0, SPEC.hidden_size), 1.0, dtype=torch.bfloat16)
    res = BACKEND.forward(prepared, torch.empty(0, SPEC.hidden_size, dtype=torch.bfloat16),
                          torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2), out)
    assert res is out and fake.calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_out_written_in_place(fake, dtype):
    spec = small_spec(E=3, k=2, H=128, I=64)  # no padding: bf16 out receives moe_sum directly
    w = random_weights(spec, "int4", seed=5)
    prepared = BACKEND.prepare(spec, w)
    x, ids, tw = moe_inputs(spec, 4)
    x = x.to(dtype) + (1e-3 * torch.randn(x.shape)).to(dtype)  # fp32 / fp16 values bf16 cannot hold
    out = torch.full((4, 128), float("nan"), dtype=dtype)
    ptr = out.data_ptr()
    assert BACKEND.forward(prepared, x, ids, tw, out) is out and out.data_ptr() == ptr
    assert out.dtype == dtype and rel_err(out, spec, w, x, ids, tw) < 1e-2


def test_layout_of_another_backend_is_refused(fake):
    w = random_weights(SPEC, "mxfp4")
    other = qmoe.backends.get_backend("reference").prepare(SPEC, w)
    x, ids, tw = moe_inputs(SPEC, 2)
    with pytest.raises(ValueError, match="prepared: expected a layout prepared by marlin"):
        BACKEND.forward(other, x, ids, tw, torch.empty(2, SPEC.hidden_size, dtype=torch.bfloat16))


def test_pad_like_vllm_gives_the_same_answer(fake):
    w = random_weights(SPEC, "mxfp4", seed=6)
    b = MarlinBackend(pad_like_vllm=True, ops_namespace=fake.namespace)
    out, err, prepared = run(SPEC, w, backend=b)
    assert err < 1e-2 and prepared.meta["padding"] == "vllm"
    assert (prepared.meta["hidden_padded"], prepared.meta["intermediate_padded"]) == (256, 128)


# ---- the tests can fail: deliberately wrong layouts --------------------------------------------

def _swap_nibbles(tiles):
    b = tiles.view(torch.uint8)
    return ((b >> 4) | (b << 4)).view(torch.int32)


MUTATIONS = {  # name: (function of marlin.py replaced, wrong version made from the real one)
    "nibble pairs swapped": ("marlin_tiles", lambda real: lambda d: _swap_nibbles(real(d))),
    "scales not permuted": ("marlin_scales", lambda real: lambda s, fp4: s.transpose(1, 2).contiguous()),
    "no [0, 2, 1, 3] swap": ("marlin_scales", lambda real: lambda s, fp4: real(s, False)),
    "bias not permuted": ("marlin_bias", lambda real: lambda b: b.contiguous()),
    "int4 codes not offset by 8": ("int4_to_uint4b8", lambda real: lambda d: d),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_wrong_layouts_are_caught(fake, monkeypatch, fmt, mutation):
    if mutation == "no [0, 2, 1, 3] swap" and fmt == "int4":
        pytest.skip("int4 scales have no FP4 swap")
    if mutation == "int4 codes not offset by 8" and fmt != "int4":
        pytest.skip("only int4 is offset")
    name, make_wrong = MUTATIONS[mutation]
    monkeypatch.setattr(marlin, name, make_wrong(getattr(marlin, name)))
    _, err, _ = run(SPEC, random_weights(SPEC, fmt, seed=7))
    assert err > 0.05, (mutation, fmt, err)


def test_gate_up_order_matters(fake, monkeypatch):
    """[up; gate] halves (FlashInfer's order) instead of [gate; up] give a wrong answer."""
    w = random_weights(SPEC, "mxfp4", seed=8)
    I = SPEC.intermediate_size
    swap = lambda q: dataclasses.replace(q, data=torch.cat((q.data[:, I:], q.data[:, :I]), 1),  # noqa: E731
                                         scales=torch.cat((q.scales[:, I:], q.scales[:, :I]), 1))
    swapped = dataclasses.replace(w, w13=swap(w.w13), b13=torch.cat((w.b13[:, I:], w.b13[:, :I]), 1))
    prepared = BACKEND.prepare(SPEC, swapped)
    x, ids, tw = moe_inputs(SPEC, 6)
    out = torch.empty(6, SPEC.hidden_size, dtype=torch.bfloat16)
    BACKEND.forward(prepared, x, ids, tw, out)
    assert rel_err(out, SPEC, w, x, ids, tw) > 0.3


# ---- development oracle: vLLM 0.33's own pure-torch Marlin helpers ----------------------------
# Runs where vLLM's Python sources are unpacked (not in CI): their functions are read out of the
# source files with ast and executed (vLLM itself cannot be imported without its CUDA ops);
# gptq_marlin_repack (CUDA) is stood in for by vLLM's pure-torch marlin_weights, which vLLM's own
# tests check it against. qmoe's prepared bytes must equal theirs exactly.

VLLM_SOURCES = "/work/ref/vllm-0.33.0/vllm/model_executor/layers"
_ORACLE_FUNCTIONS = {
    "quantization/utils/marlin_utils_test.py": ("marlin_permute_weights", "marlin_weights", "get_weight_perm"),
    "quantization/utils/marlin_utils.py": ("get_scale_perms", "marlin_permute_scales", "marlin_permute_bias",
                                           "marlin_moe_permute_scales", "marlin_moe_padded_intermediate"),
    "quantization/utils/marlin_utils_fp4.py": ("_nvfp4_compute_scale_factor", "nvfp4_marlin_process_scales",
                                               "mxfp4_marlin_process_scales", "nvfp4_marlin_process_global_scale"),
    "fused_moe/oracle/int_wna16.py": ("_pad_w13_shard_cols", "_pad_rows", "_pad_w13_bias"),
}


@functools.lru_cache(maxsize=1)
def _vllm():
    import ast
    import math
    import types

    np = pytest.importorskip("numpy")

    class _Log:
        def warning_once(self, *args, **kwargs):
            pass

    ns = {"torch": torch, "np": np, "numpy": np, "math": math, "GPTQ_MARLIN_TILE": 16, "logger": _Log(),
          "get_pack_factor": lambda bits: 32 // bits, "round_up": lambda x, y: -(-x // y) * y}
    for path, names in _ORACLE_FUNCTIONS.items():
        src = os.path.join(VLLM_SOURCES, path)
        for node in ast.parse(open(src).read()).body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                exec(compile(ast.Module([node], []), src, "exec"), ns)
    v = types.SimpleNamespace(**ns)

    def repack(qweight_kn):  # gptq_marlin_repack(b_q_weight int32 [K/8, N], K, N, 4)
        q = qweight_kn.numpy().astype(np.uint32)
        codes = np.zeros((q.shape[0] * 8, q.shape[1]), dtype=np.uint32)
        for i in range(8):
            codes[i::8] = (q >> (4 * i)) & 0xF
        return v.marlin_weights(torch.from_numpy(codes.astype(np.int32)), codes.shape[0], codes.shape[1], 4,
                                v.get_weight_perm(4))

    v.repack = repack
    return v


oracle = pytest.mark.skipif(not os.path.isdir(VLLM_SOURCES), reason=f"vLLM 0.33's sources are not at {VLLM_SOURCES}")


def _vllm_int4(v, w, spec):
    """fused_moe/oracle/int_wna16.py _process_weights_marlin on compressed-tensors int4 (offset nibbles)."""
    N, G = spec.intermediate_size, 32
    w13 = marlin.int4_to_uint4b8(w.w13.data).view(torch.int32).transpose(1, 2).contiguous()
    w2 = marlin.int4_to_uint4b8(w.w2.data).view(torch.int32).transpose(1, 2).contiguous()
    s13, s2 = w.w13.scales.transpose(1, 2).contiguous(), w.w2.scales.transpose(1, 2).contiguous()
    pN = v.marlin_moe_padded_intermediate(N, G)
    w13, w2 = v._pad_w13_shard_cols(w13, N, pN), v._pad_rows(w2, pN // 8)
    s13, s2 = v._pad_w13_shard_cols(s13, N, pN), v._pad_rows(s2, pN // G)
    return {"w13": torch.stack([v.repack(q) for q in w13]), "w2": torch.stack([v.repack(q) for q in w2]),
            "s13": v.marlin_moe_permute_scales(s13, size_k=N, size_n=s13.shape[2], group_size=G),
            "s2": v.marlin_moe_permute_scales(s2, size_k=s2.shape[1] * G, size_n=s2.shape[2], group_size=G),
            "b13": v.marlin_permute_bias(v._pad_w13_bias(w.b13.to(torch.bfloat16), N, pN)),
            "b2": v.marlin_permute_bias(w.b2.to(torch.bfloat16))}


def _vllm_fp4(v, w, spec, fmt, Hp, Ip):
    """marlin_utils_fp4.py prepare_moe_fp4_layer_for_marlin (bf16 params) on zero-padded weights."""
    E, I, H = spec.num_experts, spec.intermediate_size, spec.hidden_size
    G = qmoe.formats.block_size(fmt)
    fpad = torch.nn.functional.pad
    pad13 = lambda x, c: fpad(x.view(E, 2, I, -1), (0, c - x.shape[-1], 0, Ip - I)).reshape(E, 2 * Ip, c)  # noqa
    pad2 = lambda x, c: fpad(x, (0, c - x.shape[-1], 0, Hp - H))  # noqa: E731
    w13, w2 = pad13(w.w13.data, Hp // 2), pad2(w.w2.data, Ip // 2)
    out = {"w13": torch.stack([v.repack(q.view(torch.int32).T.contiguous()) for q in w13]),
           "w2": torch.stack([v.repack(q.view(torch.int32).T.contiguous()) for q in w2])}
    for name, q, sc, (n, k) in (("13", w.w13, pad13(w.w13.scales.view(torch.uint8), Hp // G), (2 * Ip, Hp)),
                                ("2", w.w2, pad2(w.w2.scales.view(torch.uint8), Ip // G), (Hp, Ip))):
        if fmt == "mxfp4":
            sc = sc.view(torch.float8_e8m0fnu).to(torch.bfloat16)
            out["s" + name] = torch.stack([v.mxfp4_marlin_process_scales(
                v.marlin_permute_scales(s=se.T, size_k=k, size_n=n, group_size=G)) for se in sc])
        else:
            sc = sc.view(torch.float8_e4m3fn).to(torch.bfloat16)
            sf = v._nvfp4_compute_scale_factor(sc, torch.bfloat16)
            out["s" + name] = torch.stack([v.nvfp4_marlin_process_scales(
                v.marlin_permute_scales(s=se.T, size_k=k, size_n=n, group_size=G), scale_factor=sf,
                a_dtype=torch.bfloat16)[0] for se in sc])
            out["g" + name] = v.nvfp4_marlin_process_global_scale(q.global_scale, torch.bfloat16) / sf
    b13 = fpad(w.b13.view(E, 2, I), (0, Ip - I)).reshape(E, 2 * Ip).to(torch.bfloat16)
    out["b13"] = torch.stack([v.marlin_permute_bias(b) for b in b13])
    out["b2"] = torch.stack([v.marlin_permute_bias(b) for b in fpad(w.b2, (0, Hp - H)).to(torch.bfloat16)])
    return out


@oracle
@pytest.mark.parametrize("fmt, H, I, like_vllm", [
    ("int4", 256, 96, False), ("int4", 128, 64, False), ("nvfp4", 256, 96, False), ("nvfp4", 192, 192, False),
    ("mxfp4", 160, 96, False), ("mxfp4", 192, 96, True), ("mxfp4", 256, 128, False)])
def test_prepared_bytes_equal_vllms(fake, fmt, H, I, like_vllm):
    spec = small_spec(E=3, k=2, H=H, I=I)
    w = random_weights(spec, fmt, seed=5)
    p = MarlinBackend(pad_like_vllm=like_vllm, ops_namespace=fake.namespace).prepare(spec, w)
    Hp, Ip = p.meta["hidden_padded"], p.meta["intermediate_padded"]
    ref = _vllm_int4(_vllm(), w, spec) if fmt == "int4" else _vllm_fp4(_vllm(), w, spec, fmt, Hp, Ip)
    for name, r in ref.items():
        mine = p.tensors[name]
        assert mine.shape == r.shape and mine.dtype == r.dtype, (name, mine.shape, r.shape, mine.dtype, r.dtype)
        assert torch.equal(mine.view(torch.uint8), r.contiguous().view(torch.uint8)), name


@oracle
def test_nvfp4_flush_and_lift_equal_vllms():
    v = _vllm()
    s = qmoe.quantize(torch.randn(2, 64, 128), "nvfp4").scales.clone()
    s.view(torch.uint8)[0, :4, 0] = torch.tensor([1, 7, 8, 0], dtype=torch.uint8)  # 2^-9, 7 x 2^-9, 2^-6, 0
    s.view(torch.uint8)[1, 0, :2] = torch.tensor([0xB0, 0x80], dtype=torch.uint8)  # a negative scale, -0
    for scale in (s, (s.float() / 64).to(torch.float8_e4m3fn)):  # largest 448, then 7 (lifted by 2^6)
        x = marlin.nvfp4_scale_exponent(scale)
        mine = marlin.nvfp4_marlin_scales(marlin.marlin_scales(scale, True), x)
        b = scale.to(torch.bfloat16)
        sf = v._nvfp4_compute_scale_factor(b, torch.bfloat16)
        ref = torch.stack([v.nvfp4_marlin_process_scales(v.marlin_permute_scales(s=se.T, size_k=128, size_n=64,
                                                                                 group_size=16),
                                                         scale_factor=sf, a_dtype=torch.bfloat16)[0] for se in b])
        assert 2.0 ** x == sf and torch.equal(mine.view(torch.uint8), ref.view(torch.uint8))


# ---- GPU: vLLM's real library at the presets' shapes -------------------------------------------

def _real_ops():
    if not torch.cuda.is_available():
        return None
    return _vllm_ops.load()[0]


gpu = pytest.mark.skipif(_real_ops() is None, reason="needs a CUDA GPU and vLLM's _moe_C library "
                                                     "(pip install vllm, or .peers on PYTHONPATH)")
GPU_CASES = [("kimi-k2.5", "int4", False), ("gpt-oss-120b", "mxfp4", False), ("gpt-oss-120b", "mxfp4", True),
             ("qwen3-30b-a3b", "nvfp4", False)]


@functools.lru_cache(maxsize=1)  # one preset's weights at a time (kimi-k2.5 int4 is 8.5 GB)
def _gpu_weights(name, fmt):
    return qmoe.weights.random_weights(qmoe.presets[name], fmt, "cuda", seed=1, bias_std=0.5)


def _gpu_inputs(spec, M, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    ids, tw = qmoe.route(spec, torch.randn(M, spec.num_experts, device="cuda", generator=g))
    return x, ids, tw


def _gpu_rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name, fmt, like_vllm", GPU_CASES)
def test_on_gpu(name, fmt, like_vllm):
    spec = qmoe.presets[name]
    w = _gpu_weights(name, fmt)
    backend = MarlinBackend(pad_like_vllm=like_vllm)
    sup = backend.supports(spec, fmt, "cuda")
    assert sup.ok, sup.reason

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prepared = backend.prepare(spec, w)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert seconds < 30, f"{name}: prepare took {seconds:.1f} s"
    I, H = spec.intermediate_size, spec.hidden_size
    few = [0, spec.num_experts - 1]  # the prepared bytes invert to the canonical ones
    back = marlin.unpad_parts(marlin.unpad_parts(marlin.marlin_untiles(prepared.tensors["w13"][few]), 1, I, 2),
                              2, H // 2)
    assert torch.equal(marlin.uint4b8_to_int4(back) if fmt == "int4" else back, w.w13.data[few])

    for M in (1, 4, 64, 1024):  # accuracy, with missing experts, into a NaN-poisoned out
        x, ids, tw = _gpu_inputs(spec, M, seed=M)
        ids[0, 0] = -1
        if M > 1:
            ids[M - 1] = -1  # a token with no expert: its row is exactly 0
        torch.full((256 << 20,), float("nan"), device="cuda")  # dirty the allocator: empty buffers hold NaN
        out = torch.full((M, H), float("nan"), dtype=torch.bfloat16, device="cuda")
        assert backend.forward(prepared, x, ids, tw, out) is out
        assert torch.isfinite(out).all(), f"{name} {fmt} M={M}: non-finite output"
        err = _gpu_rel(out, reference_moe(spec, w, x, ids, tw))
        assert err < 1e-2, f"{name} {fmt} M={M}: relative error {err}"
        if M > 1:
            assert not out[M - 1].any()

    for M in (1, 64):  # CUDA graph replay: equal to eager within bf16 rounding (Marlin is not bitwise
        x, ids, tw = _gpu_inputs(spec, M, seed=10 + M)  # reproducible), and new inputs give new answers
        eager = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
        backend.forward(prepared, x, ids, tw, eager)
        out = torch.full_like(eager, float("nan"))
        graph = capture_graph(lambda: backend.forward(prepared, x, ids, tw, out))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _gpu_rel(out, eager) < 5e-3, f"{name} {fmt} M={M}: graph replay differs from eager"
        x2, ids2, tw2 = _gpu_inputs(spec, M, seed=20 + M)
        x.copy_(x2)
        ids.copy_(ids2)
        tw.copy_(tw2)
        graph.replay()
        torch.cuda.synchronize()
        assert _gpu_rel(out, reference_moe(spec, w, x, ids, tw)) < 1e-2
        del graph
    del prepared
    torch.cuda.empty_cache()
