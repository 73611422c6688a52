"""The humming backend: on the CPU against a fake humming (tests/fakes/humming_fake), on a GPU
against the real one.

The fake decodes humming's checkpoint schemas and its own kernel layout from the layout facts
(no qmoe code), emulates the indexed GEMM's reading of sorted_ids / expert_ids /
num_tokens_padded with the block_m of the interval table, evaluates the activation's C++
expression, and records every table it "compiles". The schema conversion it emulates was
checked against the real humming 0.1.19's convert_humming on this CPU at development time
(identical tensors; docs/peers/humming.md).
"""

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import qmoe
import qmoe.backends.humming as hb
from conftest import moe_inputs, random_weights, rel_err, small_spec
from qmoe.backends.reference import reference_moe, swiglu
from qmoe.backends.humming import BACKEND

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "humming_fake"
FORMATS = ("mxfp4", "nvfp4", "int4")
SPEC = small_spec(E=4, k=2, H=160, I=96)  # GPT-OSS SwiGLU and biases; N, K off the 256 / 128 pads
SPECS = {
    "gpt-oss": SPEC,
    "silu": dataclasses.replace(SPEC, activation=qmoe.SwiGLU(), bias=False),
    "limit": dataclasses.replace(SPEC, activation=qmoe.SwiGLU(limit=10.0)),
}


def _humming_modules():
    return {n: m for n, m in sys.modules.items() if n == "humming" or n.startswith("humming.")}


@contextlib.contextmanager
def only_humming(path):
    """sys.path with `path` in front (None: nothing added) and no humming module imported;
    sys.path and sys.modules are restored afterwards."""
    saved, saved_path = _humming_modules(), list(sys.path)
    for name in saved:
        del sys.modules[name]
    if path is not None:
        sys.path.insert(0, str(path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for name in _humming_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path[:] = saved_path
        importlib.invalidate_caches()


@pytest.fixture
def on_sm90(monkeypatch):
    monkeypatch.setattr(hb, "device_capability", lambda device: (9, 0))


@pytest.fixture
def fake(on_sm90):
    """The fake humming installed for one test; yields its STATE (compiles, calls, switches)."""
    with only_humming(FAKE):
        import humming._fake

        yield humming._fake.STATE


def run(spec, weights, prepared, M, seed=0, ids=None, out_dtype=torch.bfloat16, x_dtype=torch.bfloat16):
    x, rids, w = moe_inputs(spec, M, seed)
    ids = rids if ids is None else ids
    x = x.to(x_dtype)
    out = torch.full((M, spec.hidden_size), float("nan"), dtype=out_dtype)
    assert BACKEND.forward(prepared, x, ids, w, out) is out
    return out, rel_err(out, spec, weights, x, ids, w)


# ---- registry and declared capabilities ---------------------------------------------------------
def test_registry_and_declarations():
    assert qmoe.backends.get_backend("humming") is BACKEND
    assert BACKEND.formats == ("mxfp4", "nvfp4", "int4")
    assert BACKEND.capturable and not BACKEND.tunable
    assert "~/.humming/cache" in BACKEND.first_use and "HUMMING_CACHE_DIR" in BACKEND.first_use


# ---- supports(): reasons a user can act on --------------------------------------------------------
def test_not_installed():
    with only_humming(None):
        if importlib.util.find_spec("humming") is not None:
            pytest.skip("a real humming is installed here")
        sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "humming is not installed" in sup.reason and "pip install 'qmoe[humming]'" in sup.reason


def test_import_failure_says_why(tmp_path, on_sm90):
    (tmp_path / "humming").mkdir()
    (tmp_path / "humming" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'cuda'\", name='cuda')\n")
    with only_humming(tmp_path):
        sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok
    assert "failed to import (ModuleNotFoundError: No module named 'cuda')" in sup.reason
    assert "dependency 'cuda' is missing" in sup.reason


def test_needs_a_cuda_gpu(fake, monkeypatch):
    monkeypatch.setattr(hb, "device_capability", lambda device: None)
    sup = BACKEND.supports(SPEC, "mxfp4", "cpu")
    assert not sup.ok and sup.reason == "needs a CUDA GPU; device cpu is not one or no GPU is visible"


@pytest.mark.parametrize("cap,why", [((7, 0), "has no kernel tuning for SM70 (it has SM75, SM80"),
                                     ((7, 5), "bf16 activations need SM80 or newer in humming; this GPU is SM75")])
def test_sm_not_supported(fake, monkeypatch, cap, why):
    monkeypatch.setattr(hb, "device_capability", lambda device: cap)
    sup = BACKEND.supports(SPEC, "int4", "cuda")
    assert not sup.ok and why in sup.reason


def test_other_sms_of_known_families_are_supported(fake, monkeypatch):
    for cap in ((8, 0), (8, 9), (10, 0), (12, 0), (10, 1)):  # 10.1 runs SM100's tables
        monkeypatch.setattr(hb, "device_capability", lambda device, cap=cap: cap)
        assert BACKEND.supports(SPEC, "mxfp4", "cuda").ok, cap


def test_supported_reason_names_schema_and_activation(fake):
    sup = BACKEND.supports(SPEC, "int4", "cuda")
    assert sup.ok and sup.reason == ("humming 0.1.19+fake indexed W4A16 MoE on SM90 (compressed-tensors schema, "
                                     "binary_interleaved activation), as vLLM runs it")
    assert "binary_split" in BACKEND.supports(SPECS["limit"], "nvfp4", "cuda").reason


def test_bf16_is_refused_by_format(fake):
    sup = BACKEND.supports(SPEC, "bf16", "cuda")
    assert not sup.ok and "format bf16 is not offered (bf16: use the reference backend)" in sup.reason


def test_no_cuda_headers(fake):
    fake.cuda_env = None
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "NVRTC JIT needs the CUDA" in sup.reason and "nvidia-cuda-cccl" in sup.reason


def test_no_cccl_headers(fake, tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("\n")
    fake.cuda_env = str(tmp_path)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "CCCL's cuda/std headers" in sup.reason and str(tmp_path) in sup.reason


def test_no_nvrtc_library(fake):
    fake.nvrtc = False
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "libnvrtc" in sup.reason and "Could not locate the NVRTC library" in sup.reason


def test_nvcc_compiler_without_nvcc(fake):
    fake.compiler = "NVCCCompiler"
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "humming compiles with nvcc here and found none" in sup.reason
    fake.nvcc = True
    assert BACKEND.supports(SPEC, "mxfp4", "cuda").ok


def test_helper_without_run_bit(tmp_path, on_sm90):
    shutil.copytree(FAKE, tmp_path / "fake")
    native = tmp_path / "fake" / "humming" / "_native" / "x86_64"
    native.mkdir(parents=True)
    (native / "nvrtc_compile").write_bytes(b"\x7fELF")
    os.chmod(native / "nvrtc_compile", 0o644)
    with only_humming(tmp_path / "fake"):
        sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
        assert not sup.ok and "is not executable" in sup.reason and "chmod +x" in sup.reason
        os.chmod(native / "nvrtc_compile", 0o755)
        assert BACKEND.supports(SPEC, "mxfp4", "cuda").ok


def test_missing_api_is_a_reason_and_prepare_refuses(fake):
    import humming.forward

    def old_forward(config, inputs, weight, weight_scale=None, outputs=None, sorted_ids=None, expert_ids=None,
                    num_tokens_padded=None, locks=None, top_k=1, compute_config=None, tuning_config=None):
        raise AssertionError("never called")

    humming.forward.humming_forward = old_forward
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "humming.forward.humming_forward takes no zero_point, bias, weight_scale_2" in sup.reason
    assert "valid_shape_m" in sup.reason and "humming-kernels >= 0.1.19" in sup.reason
    with pytest.raises(ValueError, match="backend: humming cannot run format mxfp4 on cpu: .*takes no"):
        BACKEND.prepare(SPEC, random_weights(SPEC, "mxfp4"))


# ---- canonical <-> checkpoint schema ----------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_schema_round_trip(fmt, interleaved):
    w = random_weights(SPEC, fmt, seed=4)
    ck = hb.to_schema(fmt, w.w13, w.b13, interleaved=interleaved)
    q, b = hb.from_schema(fmt, ck, w.w13.shape, interleaved=interleaved)
    assert torch.equal(q.data, w.w13.data)
    assert torch.equal(q.scales.view(torch.uint8), w.w13.scales.view(torch.uint8))
    if fmt == "nvfp4":
        assert torch.equal(q.global_scale, w.w13.global_scale)
    assert b.dtype == torch.float32 and torch.equal(b, w.b13.to(torch.bfloat16).float())  # bias: bf16, as humming


def test_schema_tensors_follow_the_checkpoint_layouts():
    w = random_weights(SPEC, "int4", seed=2)
    ck = hb.to_schema("int4", w.w13)
    E, N, K = w.w13.shape
    assert set(ck) == {"weight_packed", "weight_scale"}
    assert ck["weight_packed"].dtype == torch.int32 and ck["weight_packed"].shape == (E, N, K // 8)
    # element 8j + i of a row sits in bits 4i..4i+3 of word j, as its code + 8
    words = ck["weight_packed"][1, 3].to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(-1)
    ref = torch.stack((w.w13.data[1, 3] & 0xF, w.w13.data[1, 3] >> 4), dim=1).reshape(-1).to(torch.int64)
    signed = torch.where(ref >= 8, ref - 16, ref)
    assert torch.equal(codes, signed + 8)
    # GPT-OSS rows: gate0, up0, gate1, up1, ... (and the bias alike)
    m = random_weights(SPEC, "mxfp4", seed=2)
    ck = hb.to_schema("mxfp4", m.w13, m.b13, interleaved=True)
    I = SPEC.intermediate_size
    assert torch.equal(ck["weight"][:, 0::2], m.w13.data[:, :I])
    assert torch.equal(ck["weight"][:, 1::2], m.w13.data[:, I:])
    assert torch.equal(ck["bias"][:, 1::2], m.b13[:, I:].to(torch.bfloat16))
    n = random_weights(SPEC, "nvfp4", seed=2)
    ck = hb.to_schema("nvfp4", n.w2)
    assert ck["weight_scale"].dtype == torch.float8_e4m3fn and torch.equal(ck["weight_scale_2"], n.w2.global_scale)


def test_schema_rejects_bad_input():
    w = random_weights(SPEC, "mxfp4")
    with pytest.raises(ValueError, match=r"fmt: expected one of mxfp4, int4, nvfp4, got 'bf16'"):
        hb.to_schema("bf16", w.w13)
    with pytest.raises(ValueError, match=r"q: expected a 3-D int4 QuantizedTensor, got mxfp4"):
        hb.to_schema("int4", w.w13)


# ---- the activation expression -------------------------------------------------------------------
@pytest.mark.parametrize("act", [qmoe.SwiGLU(), qmoe.SwiGLU(1.702, 1.0, 7.0), qmoe.SwiGLU(limit=10.0),
                                 qmoe.SwiGLU(alpha=0.5, beta=-0.25, limit=3.0)])
def test_activation_expression_computes_qmoe_swiglu(fake, act):
    from humming.forward import _evaluate  # the fake's C expression evaluator

    kind, impl = hb.activation(act)
    assert kind == ("binary_interleaved" if act == hb.GPT_OSS_SWIGLU else "binary_split")
    g = torch.Generator().manual_seed(0)
    a, b = 8 * torch.randn(1000, generator=g), 8 * torch.randn(1000, generator=g)
    torch.testing.assert_close(_evaluate(impl, a, b), swiglu(act, a, b), rtol=1e-6, atol=1e-6)


def test_activation_expression_text():
    assert hb.activation(qmoe.SwiGLU())[1] == "a / (1.0f + expf(-(a))) * b"
    assert hb.activation(hb.GPT_OSS_SWIGLU)[1] == (
        "(a > 7.0f ? 7.0f : a) / (1.0f + expf(-(1.702f * (a > 7.0f ? 7.0f : a)))) * "
        "((b > 7.0f ? 7.0f : (b < -7.0f ? -7.0f : b)) + 1.0f)")


def test_activation_expression_keeps_nan_like_the_reference(fake):
    """C comparisons with NaN are false, so the limit's selects keep NaN (fminf would drop it)."""
    from humming.forward import _evaluate

    a = torch.tensor([float("nan"), 9.0, -9.0, 1.0])
    b = torch.tensor([0.5, float("nan"), 9.0, -9.0])
    got = _evaluate(hb.activation(hb.GPT_OSS_SWIGLU)[1], a, b)
    want = swiglu(hb.GPT_OSS_SWIGLU, a, b)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[:2]).all()
    torch.testing.assert_close(got[2:], want[2:])


# ---- the routing arrays and the weighted sum ----------------------------------------------------------
@pytest.mark.parametrize("M,bm", [(1, 8), (7, 16), (40, 48)])
def test_align_gives_vllm_routing_arrays(M, bm):
    E, k = 5, 3
    g = torch.Generator().manual_seed(M)
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
    ids[0, 0] = -1
    if M > 1:
        ids[1, 1] = E + 2  # out of range: dropped like -1
    sorted_ids, expert_ids, ntp = hb.align(ids, E, bm)
    assert sorted_ids.dtype == expert_ids.dtype == ntp.dtype == torch.int32 and ntp.shape == (1,)
    flat = ids.reshape(-1)
    counts = [int(((flat == e)).sum()) for e in range(E)]
    assert int(ntp[0]) == sum(-(-c // bm) * bm for c in counts)
    nb = int(ntp[0]) // bm
    seen = []
    for b in range(nb):
        e = int(expert_ids[b])
        assert 0 <= e < E
        blk = sorted_ids[b * bm:(b + 1) * bm].tolist()
        assert all(s == -1 or int(flat[s]) == e for s in blk)
        seen += [s for s in blk if s != -1]
    assert sorted(seen) == [s for s in range(M * k) if 0 <= int(flat[s]) < E]
    assert sorted_ids.numel() >= nb * bm


def test_weighted_sum_skips_invalid_slots_and_adds_shared():
    M, k, H, E = 3, 2, 40, 4
    y = torch.randn(M * k, H).to(torch.bfloat16)
    y[1] = float("nan")  # an invalid slot's row holds whatever humming left there
    ids = torch.tensor([[0, -1], [2, 3], [-1, 9]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]])
    shared = torch.randn(M, H)
    out = torch.full((M, H), float("nan"))
    hb.weighted_sum(y, ids, w, E, out, shared)
    ref = torch.stack([0.5 * y[0].float(), 0.25 * y[2].float() + 0.75 * y[3].float(), torch.zeros(H)]) + shared
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# ---- prepare and forward against the reference ----------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", list(SPECS))
def test_matches_reference(fake, fmt, act):
    spec = SPECS[act]
    w = random_weights(spec, fmt, seed=10 * FORMATS.index(fmt) + list(SPECS).index(act))
    prepared = BACKEND.prepare(spec, w)
    schema = {"mxfp4": "gpt_oss_mxfp4" if act == "gpt-oss" else "mxfp4", "int4": "compressed-tensors",
              "nvfp4": "modelopt"}[fmt]
    assert [c["method"] for c in fake.calls_of("convert_humming")] == [schema, schema]
    assert prepared.meta["interleaved"] == (act == "gpt-oss")
    for M in (2, 40):  # one interval of both tables, then block_m 32 (w13) and 16 (w2)
        out, err = run(spec, w, prepared, M, seed=M)
        assert torch.isfinite(out).all() and err < 1e-2, (fmt, act, M, err)


def test_prepare_and_forward_as_vllm_calls_humming(fake):
    w = random_weights(SPEC, "nvfp4")
    prepared = BACKEND.prepare(SPEC, w)
    H, I, k = 160, 96, 2
    conv = fake.calls_of("convert_humming")
    assert [(c["method"], c["N"], c["K"], c["stacks"]) for c in conv] == [("modelopt", 2 * I, H, [I, I]),
                                                                            ("modelopt", H, I, [H])]
    assert all(c["pad"] == (256, 128) for c in fake.calls_of("transform"))
    assert fake.calls_of("get_heuristics_config") == [{"gemm_type": "indexed", "use_f16_accum": False,
                                                       "use_batch_invariant": False}] * 2
    c13, c2 = prepared.meta["layers"]["w13"].config, prepared.meta["layers"]["w2"].config
    assert (c13.shape_n, c13.pad_shape_n, c13.shape_k, c13.pad_shape_k) == (256, 256 - 2 * I, 256, 256 - H)
    assert (c2.shape_n, c2.pad_shape_n, c2.shape_k, c2.pad_shape_k) == (256, 256 - H, 128, 128 - I)
    assert set(prepared.tensors) == {"w13.weight", "w13.weight_scale", "w13.weight_scale_2", "w13.bias",
                                     "w2.weight", "w2.weight_scale", "w2.weight_scale_2", "w2.bias", "locks"}
    fake.calls.clear()
    M = 40  # 80 rows over 4 experts: the fake's tables pick block_m 32 for w13 and 16 for w2
    out, err = run(SPEC, w, prepared, M)
    assert err < 1e-2
    g1, g2 = fake.calls_of("humming_forward")
    assert (g1["top_k"], g1["valid_shape_m"], g1["rows"], g1["N"], g1["K"]) == (k, M * k, M, 2 * I, H)
    assert (g2["top_k"], g2["valid_shape_m"], g2["rows"], g2["N"], g2["K"]) == (1, M * k, M * k, H, I)
    assert (g1["block_m"], g2["block_m"]) == (32, 16)
    assert [c["activation_type"] for c in fake.calls_of("may_process_input")] == ["binary_interleaved"]


def test_every_kernel_is_compiled_in_prepare(fake):
    w = random_weights(SPEC, "mxfp4")
    prepared = BACKEND.prepare(SPEC, w)
    kinds = [c[0] for c in fake.compiles]
    assert kinds.count("gemm") == 2 and kinds.count("activation") == 1
    compiled = len(fake.compiles)
    blocks = set()
    for M in (1, 3, 40, 130):  # rows 2 .. 260: three interval pairs, both grouping paths
        out, err = run(SPEC, w, prepared, M, seed=M)
        assert err < 1e-2
        blocks |= {tuple(c["block_m"] for c in fake.calls_of("humming_forward")[-2:])}
    assert len(fake.compiles) == compiled  # nothing compiled inside a forward
    assert any(b1 != b2 for b1, b2 in blocks) and len(blocks) >= 3  # several intervals, both groupings


def test_pdl_variants_are_compiled_in_prepare(fake):
    fake.pdl_rows = 4  # as on SM120: small row counts launch the activation with PDL
    w = random_weights(SPEC, "int4")
    prepared = BACKEND.prepare(SPEC, w)
    assert sorted(c[1][3] for c in fake.compiles if c[0] == "activation") == [False, True]
    compiled = len(fake.compiles)
    for M in (1, 40):
        run(SPEC, w, prepared, M)
    assert len(fake.compiles) == compiled
    assert [c["use_pdl"] for c in fake.calls_of("may_process_input")][-2:] == [True, False]


def test_int4_with_minus_eight_codes(fake):
    """Codes -8 (offset-binary 0) keep humming's uint4 path; without them it converts to e0m3."""
    spec = SPECS["silu"]
    w = random_weights(spec, "int4", seed=3)
    data = w.w2.data.clone()
    data[:, :, 0] = (data[:, :, 0] & 0xF0) | 0x8
    w = dataclasses.replace(w, w2=qmoe.QuantizedTensor("int4", w.w2.shape, data, w.w2.scales))
    prepared = BACKEND.prepare(spec, w)
    assert [c["schema"].b_dtype for c in fake.calls_of("convert_humming")] == ["float4e0m3", "uint4"]
    _, err = run(spec, w, prepared, 6)
    assert err < 1e-2


@pytest.mark.parametrize("minus_eight", [False, True])
def test_int4_conversion_in_chunks_equals_one_call(fake, monkeypatch, minus_eight):
    spec = SPECS["silu"]
    w = random_weights(spec, "int4", seed=7)
    data = w.w13.data.clone()
    if minus_eight:
        data[3, 5, 7] = 0x88  # two -8 codes in the last chunk only
    q = qmoe.QuantizedTensor("int4", w.w13.shape, data, w.w13.scales)
    ck, I = hb.to_schema("int4", q), spec.intermediate_size
    api = hb.load()[0]
    whole = api.convert(hb.SCHEMAS["int4"], "int4", ck, q.shape, [I, I])
    monkeypatch.setattr(hb, "INT4_CHUNK_ELEMENTS", 2 * q.shape[1] * q.shape[2])  # 2 experts per chunk
    fake.calls.clear()
    chunked = api.convert(hb.SCHEMAS["int4"], "int4", ck, q.shape, [I, I])
    assert len(fake.calls_of("convert_humming")) == (4 if minus_eight else 2)  # redone without sign-magnitude
    assert chunked[0] == whole[0] and whole[0].b_dtype == ("uint4" if minus_eight else "float4e0m3")
    assert set(chunked[1]) == set(whole[1]) and all(torch.equal(chunked[1][k], whole[1][k]) for k in whole[1])


def test_missing_experts_and_shared_output(fake):
    w = random_weights(SPEC, "mxfp4", seed=1)
    prepared = BACKEND.prepare(SPEC, w)
    x, ids, tw = moe_inputs(SPEC, 6, seed=2)
    ids[1, 0] = -1
    ids[3] = -1          # a token with no expert on this rank: out = shared_output alone
    ids[4, 1] = 7        # an id past E: contributes nothing, reads nothing out of bounds
    shared = torch.randn(6, SPEC.hidden_size)
    out = torch.full((6, SPEC.hidden_size), float("nan"), dtype=torch.bfloat16)
    BACKEND.forward(prepared, x, ids, tw, out, shared_output=shared)
    ref_ids = torch.where(ids >= SPEC.num_experts, -1, ids)
    assert rel_err(out, SPEC, w, x, ref_ids, tw, shared=shared) < 1e-2
    # (Triton's interpreter rounds fp32 -> bf16 by truncation: one bf16 step of tolerance)
    torch.testing.assert_close(out[3].float(), shared[3], rtol=2 ** -7, atol=0)


def test_zero_tokens_return_out_untouched(fake):
    prepared = BACKEND.prepare(SPEC, random_weights(SPEC, "nvfp4"))
    fake.calls.clear()
    out = torch.empty(0, SPEC.hidden_size, dtype=torch.bfloat16)
    res = BACKEND.forward(prepared, torch.empty(0, SPEC.hidden_size, dtype=torch.bfloat16),
                          torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2), out)
    assert res is out and fake.calls == []


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.bfloat16)])
def test_out_written_in_place_in_its_dtype(fake, x_dtype, out_dtype):
    w = random_weights(SPEC, "int4", seed=6)
    prepared = BACKEND.prepare(SPEC, w)
    x, ids, tw = moe_inputs(SPEC, 4)
    x = x.to(x_dtype) + (1e-3 * torch.randn(x.shape)).to(x_dtype)  # fp32 / fp16 values off the bf16 grid
    out = torch.full((4, SPEC.hidden_size), float("nan"), dtype=out_dtype)
    ptr = out.data_ptr()
    assert BACKEND.forward(prepared, x, ids, tw, out) is out and out.data_ptr() == ptr
    assert out.dtype == out_dtype and torch.isfinite(out).all()
    assert rel_err(out, SPEC, w, x.to(torch.bfloat16), ids, tw) < 1e-2


def test_layout_of_another_humming_version_is_refused(fake):
    prepared = BACKEND.prepare(SPEC, random_weights(SPEC, "mxfp4"))
    x, ids, tw = moe_inputs(SPEC, 2)
    out = torch.empty(2, SPEC.hidden_size, dtype=torch.bfloat16)
    with only_humming(FAKE):
        import humming

        humming.__version__ = "0.1.20"
        with pytest.raises(ValueError, match=r"prepared: layout made under humming 0\.1\.19\+fake, "
                                             r"but humming 0\.1\.20 is loaded"):
            BACKEND.forward(prepared, x, ids, tw, out)


def test_refuses_another_backends_layout(fake):
    prepared = qmoe.backends.get_backend("reference").prepare(SPEC, random_weights(SPEC, "mxfp4"))
    x, ids, tw = moe_inputs(SPEC, 2)
    with pytest.raises(ValueError, match="prepared: expected a layout prepared by humming, got one by reference"):
        BACKEND.forward(prepared, x, ids, tw, torch.empty(2, SPEC.hidden_size, dtype=torch.bfloat16))


# ---- GPU: the real humming at preset shapes ------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name,fmt", [("gpt-oss-120b", "mxfp4"), ("kimi-k2.5", "int4"), ("qwen3-30b-a3b", "nvfp4")])
def test_presets_on_gpu(name, fmt):
    if not hb.installed():
        pytest.skip("humming is not installed")
    spec = qmoe.presets[name]
    sup = BACKEND.supports(spec, fmt, "cuda")
    assert sup.ok, sup.reason
    w = qmoe.weights.random_weights(spec, fmt, "cuda", bias_std=0.5)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prepared = BACKEND.prepare(spec, w)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    layers = prepared.meta["layers"]
    kernels = {n: len({json.dumps(c, sort_keys=True) for _, _, c in json.loads(lay.tuning)})
               for n, lay in layers.items()}
    print(f"\nhumming {hb.load()[0].version} {name} {fmt}: prepare {seconds:.1f} s, of which the warm-up (JIT "
          f"when the cache is cold) {prepared.meta['warm_up_seconds']:.1f} s; intervals "
          f"{ {n: len(lay.blocks) for n, lay in layers.items()} }, distinct kernel configs {kernels}")
    for M in (1, 4, 64, 1024):
        x = torch.randn(M, spec.hidden_size, device="cuda").to(torch.bfloat16)
        ids, tw = qmoe.routing.route(spec, torch.randn(M, spec.num_experts, device="cuda"))
        if M > 1:
            ids[1, 0] = -1  # one slot off this rank
        out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
        BACKEND.forward(prepared, x, ids, tw, out)
        assert torch.isfinite(out).all()
        ref = reference_moe(spec, w, x, ids, tw)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"  M={M}: rel. error {err:.2e}")
        assert err < 1e-2, f"{name} {fmt} M={M}: {err}"
        again = torch.full_like(out, float("nan"))
        BACKEND.forward(prepared, x, ids, tw, again)
        assert torch.equal(again, out), "two runs differ"
        graphed = torch.full_like(out, float("nan"))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            BACKEND.forward(prepared, x, ids, tw, graphed)
        torch.cuda.current_stream().wait_stream(s)
        graphed.fill_(float("nan"))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            BACKEND.forward(prepared, x, ids, tw, graphed)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(graphed, out), f"{name} M={M}: CUDA-graph replay differs from eager"
        del g
    del prepared, w
    torch.cuda.empty_cache()
