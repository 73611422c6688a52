"""triton_kernels (OpenAI's matmul_ogs MoE, SM90 MXFP4 W4A16, as vLLM 0.33 runs it).

- CPU: against fake API generations (tests/fakes/triton_kernels_fake: release/3.5.x, 3.8+ and
  vLLM's vendored copy), whose kernels decode their own layouts and compute in torch.
- Oracle (runs only where the real package imports, e.g. PYTHONPATH=.peers; CPU tensors): the
  prepared bytes equal what vLLM's MXFP4 path makes from the same checkpoint bytes, and the real
  routing metadata has the semantics the fake models.
- GPU (@pytest.mark.gpu): the real kernels at gpt-oss shapes against the float64 reference.
"""

import dataclasses
import os
import sys

import pytest
import torch

import qmoe
import triton_kernels_fake as fake
from conftest import random_weights, small_spec
from qmoe.backends import triton_kernels as tk
from qmoe.backends.reference import reference_moe
from qmoe.backends.triton_kernels import BACKEND
from triton_kernels_fake._common import FakeKernelError

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the fakes compute in torch on either
SPEC = small_spec(E=4, k=2, H=192, I=96)  # I -> 128 (vLLM's 64 rule), H/32 = 6 scale groups -> 8
GENERATIONS = ["3.5", "3.8", "vendored"]


@pytest.fixture
def on_sm90(monkeypatch):
    monkeypatch.setattr(tk, "device_capability", lambda device: (9, 0))


@pytest.fixture
def install():
    with fake.sandbox() as install:
        yield install


@pytest.fixture(scope="module")
def weights():
    return random_weights(SPEC).to(DEV)


def inputs(spec, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, spec.hidden_size, generator=g).to(torch.bfloat16)
    ids, w = qmoe.route(spec, torch.randn(M, spec.num_experts, generator=g))
    return x.to(DEV), ids.to(DEV), w.to(DEV)


def rel_err(out, spec, weights, x, ids, w, shared=None):
    ref = reference_moe(spec, weights, x, ids, w, shared)
    return ((out.double() - ref).norm() / ref.norm()).item()


def run(spec, weights, M=6, seed=0, prepared=None):
    """(out, relative error against the float64 reference, prepared) for M random tokens."""
    prepared = prepared or BACKEND.prepare(spec, weights)
    x, ids, w = inputs(spec, M, seed)
    out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert BACKEND.forward(prepared, x, ids, w, out) is out
    return out, rel_err(out, spec, weights, x, ids, w), prepared


def fake_unswizzle(t):
    """The fake's own inverse of its layout: triton_kernels Tensor -> its [E, K/2 or G, N] bytes."""
    layout = t.storage.layout
    if hasattr(layout, "unswizzle_data"):  # 3.5: the layout object knows its shape
        return layout.unswizzle_data(t.storage.data)
    args = (t.shape, True) if "Value" in type(layout).__name__ else (t.shape,)
    return layout.make_transformation(*args).unswizzle_data(t.storage.data)


# --- declared capabilities and reasons -------------------------------------------------------------
def test_name_registry_and_declarations():
    assert qmoe.backends.get_backend("triton_kernels") is BACKEND
    assert BACKEND.formats == ("mxfp4",) and BACKEND.capturable and not BACKEND.tunable
    assert "JIT" in BACKEND.first_use and "warm-up" in BACKEND.first_use


def test_not_installed(install, on_sm90):
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "triton_kernels is not installed" in sup.reason and "pip install vllm" in sup.reason
    with pytest.raises(ValueError, match="triton_kernels is not installed"):
        BACKEND.prepare(SPEC, random_weights(SPEC))


def test_device_reasons(install, monkeypatch):
    install("3.5")
    monkeypatch.setattr(tk, "device_capability", lambda device: None)
    assert "needs a CUDA GPU (SM90)" in BACKEND.supports(SPEC, "mxfp4", "cpu").reason
    for cap, sm in (((8, 0), "SM80"), ((10, 0), "SM100"), ((12, 0), "SM120")):
        monkeypatch.setattr(tk, "device_capability", lambda device, cap=cap: cap)
        sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
        assert not sup.ok and f"need SM90; this GPU is {sm}" in sup.reason


def test_real_capability_check_is_kept():
    assert tk.device_capability("cpu") is None
    assert not BACKEND.supports(SPEC, "mxfp4", "cpu").ok


@pytest.mark.parametrize("fmt", ["nvfp4", "int4", "bf16"])
def test_other_formats_refused(install, on_sm90, fmt):
    install("3.5")
    sup = BACKEND.supports(SPEC, fmt, "cuda")
    assert not sup.ok and f"format {fmt} is not offered" in sup.reason and "marlin" in sup.reason


@pytest.mark.parametrize("act", [qmoe.SwiGLU(), qmoe.SwiGLU(1.0, 0.0, 10.0), qmoe.SwiGLU(1.702, 0.5, 7.0)])
def test_activation_without_beta_one_refused(install, on_sm90, act):
    install("3.5")
    spec = dataclasses.replace(SPEC, activation=act)
    sup = BACKEND.supports(spec, "mxfp4", "cuda")
    assert not sup.ok and "beta is fixed at 1" in sup.reason and f"beta = {act.beta:g}" in sup.reason
    with pytest.raises(ValueError, match="beta is fixed at 1"):
        BACKEND.prepare(spec, random_weights(spec))


def test_shape_reasons(install, on_sm90):
    install("3.5")
    sup = BACKEND.supports(small_spec(E=4, k=2, H=160, I=96), "mxfp4", "cuda")
    assert not sup.ok and "hidden_size 160 is not a multiple of 64" in sup.reason
    sup = BACKEND.supports(small_spec(E=4, k=3, H=128, I=64), "mxfp4", "cuda")
    assert not sup.ok and "top_k 3 is not a power of two" in sup.reason


def test_the_3_6_generation_is_refused(install, on_sm90, monkeypatch):
    install("3.5")
    monkeypatch.setitem(sys.modules, "triton_kernels.routing", None)  # matmul_ogs without the 3.5 routing
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "3.6 releases" in sup.reason and "release/3.5.x" in sup.reason


def test_missing_class_is_named(install, on_sm90, monkeypatch):
    install("3.5")
    import triton_kernels.matmul_ogs as mo

    monkeypatch.delattr(mo, "PrecisionConfig")
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "lacks triton_kernels.matmul_ogs.PrecisionConfig" in sup.reason


def test_missing_gemm_is_named(install, on_sm90, monkeypatch):
    install("3.5")
    monkeypatch.setitem(sys.modules, "triton_kernels.matmul_ogs", None)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "neither matmul_ogs.matmul_ogs nor matmul.matmul" in sup.reason


def test_missing_parameter_is_named(install, on_sm90, monkeypatch):
    install("3.5")
    import triton_kernels.matmul_ogs as mo

    real = mo.matmul_ogs
    monkeypatch.setattr(mo, "matmul_ogs", lambda x, w, bias, routing_data=None, y=None: real)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "lacks the <lambda> parameter(s) gather_indx, scatter_indx" in sup.reason


def test_broken_package_is_a_reason(install, on_sm90, tmp_path):
    (tmp_path / "triton_kernels").mkdir()
    (tmp_path / "triton_kernels" / "__init__.py").write_text("raise ImportError('no libcuda here')\n")
    install(str(tmp_path))
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "triton_kernels failed to import: ImportError: no libcuda here" in sup.reason


def test_vendored_copy_is_registered_as_triton_kernels(install, on_sm90):
    install("vendored")
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert sup.ok and "vllm.third_party.triton_kernels" in sup.reason
    assert sys.modules["triton_kernels"].__name__ == "vllm.third_party.triton_kernels"
    assert sys.modules["triton_kernels.matmul_ogs"].__name__ == "triton_kernels.matmul_ogs"


# --- the forward against the reference ------------------------------------------------------------
@pytest.mark.parametrize("gen", GENERATIONS)
def test_matches_reference(install, on_sm90, weights, gen):
    install(gen)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    api_gen = "matmul" if gen == "3.8" else "matmul_ogs"
    assert sup.ok and f"{api_gen} API" in sup.reason
    out, err, prepared = run(SPEC, weights, M=7)
    assert err < 1e-2
    assert prepared.meta["generation"] == api_gen and prepared.meta["intermediate_padded"] == 128
    assert {"w13", "s13", "w2", "s2", "b13", "b2"} <= set(prepared.tensors)


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
def test_calls_like_vllm(install, on_sm90, weights, gen):
    install(gen)
    prepared = BACKEND.prepare(SPEC, weights)
    flags = sys.modules["triton_kernels.matmul_ogs_details.opt_flags" if gen == "3.5"
                        else "triton_kernels.matmul_details.opt_flags"]
    assert flags._opt_flags_constraints == {"split_k": 1}
    fake.calls().clear()
    run(SPEC, weights, prepared=prepared)
    gemms = [d for name, d in fake.calls() if name.startswith("matmul")]
    assert [(d["gather"], d["act"]) for d in gemms] == [(True, "swiglu"), (False, "dflt")]
    assert gemms[0]["fn_args"] == (1.702, 7.0) and gemms[0]["gammas"] is None
    # routing weights: rounded to bf16 on 3.5 (vLLM's make_routing_data), fp32 on 3.8
    assert gemms[1]["gammas"] == (torch.bfloat16 if gen == "3.5" else torch.float32)
    if gen == "3.5":
        assert [name for name, _ in fake.calls()][0] == "routing_from_bitmatrix"


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
def test_prepared_layout(install, on_sm90, weights, gen):
    """The fake's own inverse of the prepared tensors gives interleaved, zero-padded K-major bytes."""
    install(gen)
    p = BACKEND.prepare(SPEC, weights)
    E, H, I, Ip = SPEC.num_experts, SPEC.hidden_size, SPEC.intermediate_size, 128
    groups = 8 if gen == "3.5" else 6  # vLLM's multiple of 4 only where the kernels need it
    w13 = fake_unswizzle(p.meta["w13"])  # [E, H/2, 2Ip]
    s13 = fake_unswizzle(p.meta["precision13"].weight_scale if gen == "3.5" else p.meta["precision13"].b_mx_scale)
    assert p.meta["w13"].shape == [E, H, 2 * Ip] and tuple(w13.shape) == (E, H // 2, 2 * Ip)
    assert tuple(s13.shape) == (E, groups, 2 * Ip)
    d, s = weights.w13.data, weights.w13.scales
    assert torch.equal(w13[:, :, 0:2 * I:2], d[:, :I].transpose(1, 2))   # column 2j: gate row j
    assert torch.equal(w13[:, :, 1:2 * I:2], d[:, I:].transpose(1, 2))   # column 2j + 1: up row j
    assert not w13[:, :, 2 * I:].any() and not s13[:, :, 2 * I:].any() and not s13[:, H // 32:].any()
    assert torch.equal(s13[:, :H // 32, 1:2 * I:2], s[:, I:].transpose(1, 2))
    w2 = fake_unswizzle(p.meta["w2"])  # [E, Ip/2, H]
    assert tuple(w2.shape) == (E, Ip // 2, H)
    assert torch.equal(w2[:, :I // 2], weights.w2.data.transpose(1, 2)) and not w2[:, I // 2:].any()
    b13 = p.tensors["b13"]
    assert b13.dtype == torch.float32 and tuple(b13.shape) == (E, 2 * Ip)
    assert torch.equal(b13[:, 0:2 * I:2], weights.b13[:, :I]) and torch.equal(b13[:, 1:2 * I:2], weights.b13[:, I:])
    assert not b13[:, 2 * I:].any() and torch.equal(p.tensors["b2"], weights.b2)


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
def test_wrong_interleave_is_caught(install, on_sm90, weights, monkeypatch, gen):
    """The tests can fail: [gate; up] left as is, or interleaved up first, gives a wrong answer."""
    install(gen)
    monkeypatch.setattr(tk, "interleave_gate_up", lambda t: t)
    assert run(SPEC, weights)[1] > 0.3
    up_first = (lambda t: torch.stack((t[:, t.shape[1] // 2:], t[:, :t.shape[1] // 2]), 2).reshape(t.shape))
    monkeypatch.setattr(tk, "interleave_gate_up", up_first)
    assert run(SPEC, weights)[1] > 0.3


def test_missing_scale_padding_is_caught(install, on_sm90, weights, monkeypatch):
    install("3.5")
    monkeypatch.setattr(tk, "SCALE_GROUP_ALIGN", 1)
    with pytest.raises(FakeKernelError, match="multiple of 4"):
        BACKEND.prepare(SPEC, weights)  # its warm-up forward reaches the kernel


@pytest.mark.parametrize("gen", GENERATIONS)
def test_empty_slots_contribute_nothing(install, on_sm90, weights, gen):
    install(gen)
    prepared = BACKEND.prepare(SPEC, weights)
    x, ids, w = inputs(SPEC, 6, seed=2)
    ids[1, 0] = -1  # expert not on this rank
    ids[3] = -1     # no expert at all: the row is the shared output
    shared = torch.randn(6, SPEC.hidden_size, device=DEV)
    out = torch.full((6, SPEC.hidden_size), float("nan"), dtype=torch.bfloat16, device=DEV)
    BACKEND.forward(prepared, x, ids, w, out, shared_output=shared)
    assert rel_err(out, SPEC, weights, x, ids, w, shared) < 1e-2
    assert torch.allclose(out[3].float(), shared[3], atol=2e-2)


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
def test_more_slots_than_experts(install, on_sm90, gen):
    """An expert-parallel rank's local spec: k = 4 slots over 2 experts (prepare's warm-up too)."""
    install(gen)
    spec = small_spec(E=2, k=4, H=128, I=64)
    x, _, tw = inputs(small_spec(E=4, k=4, H=128, I=64), 5, seed=7)
    ids = torch.tensor([[0, -1, 1, -1], [1, -1, -1, -1], [-1, -1, -1, -1], [0, 1, -1, -1], [-1, 0, -1, 1]],
                       dtype=torch.int32, device=DEV)
    _row_two_empty(spec, 6, x, ids, tw)


def _row_two_empty(spec, seed, x, ids, tw):
    """prepare (its warm-up included) and one forward, whose row 2 has no expert: it is 0."""
    w = random_weights(spec, seed=seed).to(DEV)
    prepared = BACKEND.prepare(spec, w)
    out = torch.full((x.shape[0], spec.hidden_size), float("nan"), dtype=torch.bfloat16, device=DEV)
    BACKEND.forward(prepared, x, ids, tw, out)
    assert not out[2].any() and rel_err(out, spec, w, x, ids, tw) < 1e-2


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
def test_top_k_one_with_empty_slot(install, on_sm90, gen):
    """k = 1 takes 3.5's fused-scatter path, which never writes a token without an expert."""
    install(gen)
    spec = small_spec(E=4, k=1, H=128, I=64)
    x, ids, tw = inputs(spec, 5, seed=3)
    ids[2] = -1
    _row_two_empty(spec, 4, x, ids, tw)


def test_non_power_of_two_top_k_on_the_later_generation(install, on_sm90):
    install("3.8")
    spec = small_spec(E=8, k=3, H=128, I=64)
    w = random_weights(spec, seed=5).to(DEV)
    assert run(spec, w)[1] < 1e-2


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
def test_zero_tokens_return_out_untouched(install, on_sm90, weights, gen):
    install(gen)
    prepared = BACKEND.prepare(SPEC, weights)
    fake.calls().clear()
    out = torch.empty(0, SPEC.hidden_size, dtype=torch.bfloat16, device=DEV)
    res = BACKEND.forward(prepared, torch.empty(0, SPEC.hidden_size, dtype=torch.bfloat16, device=DEV),
                          torch.empty(0, 2, dtype=torch.int32, device=DEV), torch.empty(0, 2, device=DEV), out)
    assert res is out and fake.calls() == []


def test_result_lands_in_the_callers_tensor(install, on_sm90, weights):
    install("3.5")
    prepared = BACKEND.prepare(SPEC, weights)
    fake.calls().clear()
    out, err, _ = run(SPEC, weights, M=3, prepared=prepared)
    assert err < 1e-2
    assert fake.calls()[-1][1]["y_ptr"] == out.data_ptr()  # the w2 GEMM wrote straight into out


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_activation_dtypes_round_to_bf16(install, on_sm90, weights, gen, dtype):
    install(gen)
    prepared = BACKEND.prepare(SPEC, weights)
    x, ids, w = inputs(SPEC, 4)
    x = (x.float() + 1e-3 * torch.randn(x.shape, device=DEV)).to(dtype)  # not representable in bf16
    out = torch.full((4, SPEC.hidden_size), float("nan"), dtype=dtype, device=DEV)
    ptr = out.data_ptr()
    assert BACKEND.forward(prepared, x, ids, w, out) is out and out.data_ptr() == ptr
    assert rel_err(out, SPEC, weights, x, ids, w) < 1e-2


@pytest.mark.parametrize("gen", ["3.5", "3.8"])
def test_no_limit_runs_as_float32_max(install, on_sm90, gen):
    install(gen)
    spec = dataclasses.replace(SPEC, activation=qmoe.SwiGLU(alpha=1.702, beta=1.0, limit=None), bias=False)
    w = random_weights(spec, seed=6).to(DEV)
    assert BACKEND.supports(spec, "mxfp4", "cuda").ok
    out, err, prepared = run(spec, w)
    assert err < 1e-2 and "b13" not in prepared.tensors
    gemm1 = next(d for name, d in fake.calls() if name.startswith("matmul") and d["act"] == "swiglu")
    assert gemm1["fn_args"] == (1.702, torch.finfo(torch.float32).max)


# --- qmoe's layout steps and the bitmatrix: each with its inverse -------------------------------------
@pytest.mark.parametrize("gated", [True, False])
def test_kernel_order_round_trip(gated):
    g = torch.Generator().manual_seed(7)
    E, N, K = 3, 10, 96
    data = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (E, N, K // 32), dtype=torch.uint8, generator=g)
    rows, k = (16, 128) if gated else (12, 128)
    d, s = tk.to_kernel_order(data, scales, rows, k, gated=gated)
    assert tuple(d.shape) == (E, k // 2, rows) and d.stride(1) == 1  # K-major view
    assert tuple(s.shape) == (E, 4, rows) and s.stride(1) == 1
    back = tk.from_kernel_order(d, s, N, K, gated=gated)
    assert torch.equal(back[0], data) and torch.equal(back[1], scales)
    if gated:
        assert torch.equal(d[:, :K // 2, 0], data[:, 0]) and torch.equal(d[:, :K // 2, 1], data[:, N // 2])
        assert not d[:, :, N:].any()
    assert not d[:, K // 2:].any() and not s[:, K // 32:].any()


def test_interleave_round_trip():
    t = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    inter = tk.interleave_gate_up(t)
    assert torch.equal(inter[:, 0::2], t[:, :3]) and torch.equal(inter[:, 1::2], t[:, 3:])
    assert torch.equal(tk.deinterleave_gate_up(inter), t)


@pytest.mark.parametrize("E,k", [(40, 4), (70, 3), (32, 6), (8, 1)])
def test_pack_bitmatrix(E, k):
    g = torch.Generator().manual_seed(E + k)
    M = 150
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int16)
    ids[5, 0] = -1
    ids[9] = -1
    ids = ids.to(DEV)
    # garbage (all bits set) everywhere: every word must be written
    bits = torch.full((M, -(-E // 32)), -1, dtype=torch.int32).view(torch.uint32).to(DEV)
    tk.pack_bitmatrix(ids, bits)
    want = torch.zeros(M, E + 1, dtype=torch.bool, device=DEV)
    want.scatter_(1, torch.where(ids >= 0, ids.long(), E), True)
    assert torch.equal(tk.unpack_bitmatrix(bits, E), want[:, :E])
    tail = tk.unpack_bitmatrix(bits, bits.shape[1] * 32)[:, E:]
    assert not tail.any()


# --- oracle: the real package (where it imports), on CPU tensors ---------------------------------------
def _real_api():
    api, why = tk.load()
    if api is None or "triton_kernels_fake" in api.origin:
        pytest.skip(f"the real triton_kernels is not importable here ({why or api.origin}); "
                    f"run with PYTHONPATH=.peers")
    return api


@pytest.mark.parametrize("E,k,H,I", [(3, 2, 192, 96), (2, 2, 2880, 2880)])
def test_prepare_bytes_match_vllms_path(monkeypatch, tmp_path, E, k, H, I):
    """vLLM's MXFP4 path from the GPT-OSS checkpoint bytes: padded params (zeros), scale groups
    padded to 4, transposed, convert_layout into HopperMXValue/ScaleLayout(mx_axis=1, num_warps=8)."""
    api = _real_api()
    from safetensors import safe_open
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout

    monkeypatch.setattr(tk, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(tk, "_warm_up", lambda backend, prepared: None)  # the real kernels need a GPU
    spec = small_spec(E=E, k=k, H=H, I=I)
    w = random_weights(spec)
    prepared = BACKEND.prepare(spec, w)
    assert prepared.meta["api"] is api
    path = str(tmp_path / "layer.safetensors")
    qmoe.save_gpt_oss(path, {0: (w, torch.zeros(E, H), torch.zeros(E))})
    with safe_open(path, framework="pt") as f:
        p = "model.layers.0.mlp.experts."
        gate_up = f.get_tensor(p + "gate_up_proj_blocks").reshape(E, 2 * I, H // 2)
        gate_up_s = f.get_tensor(p + "gate_up_proj_scales")
        down = f.get_tensor(p + "down_proj_blocks").reshape(E, H, I // 2)
        down_s = f.get_tensor(p + "down_proj_scales")
    Ip = -(-I // 64) * 64
    w13 = torch.zeros(E, 2 * Ip, H // 2, dtype=torch.uint8)
    w13[:, :2 * I] = gate_up
    s13 = torch.zeros(E, 2 * Ip, H // 32, dtype=torch.uint8)
    s13[:, :2 * I] = gate_up_s
    w2 = torch.zeros(E, H, Ip // 2, dtype=torch.uint8)
    w2[:, :, :I // 2] = down
    s2 = torch.zeros(E, H, Ip // 32, dtype=torch.uint8)
    s2[:, :, :I // 32] = down_s

    def vllm_swizzle(q, s):
        s = torch.nn.functional.pad(s, (0, -s.shape[-1] % 4))
        q, s = q.transpose(-2, -1), s.transpose(-2, -1)
        return (convert_layout(wrap_torch_tensor(q, dtype=FP4), HopperMXValueLayout, mx_axis=1),
                convert_layout(wrap_torch_tensor(s), HopperMXScaleLayout, mx_axis=1, num_warps=8))

    (v13, vs13), (v2, vs2) = vllm_swizzle(w13, s13), vllm_swizzle(w2, s2)
    meta = prepared.meta
    for mine, theirs in ((meta["w13"], v13), (meta["w2"], v2), (meta["precision13"].weight_scale, vs13),
                         (meta["precision2"].weight_scale, vs2)):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        assert mine.storage.data.stride() == theirs.storage.data.stride()
        assert torch.equal(mine.storage.data, theirs.storage.data)
        assert type(mine.storage.layout) is type(theirs.storage.layout)
    b13 = torch.zeros(E, 2 * Ip)
    b13[:, :2 * I] = w.b13.view(E, 2, I).transpose(1, 2).reshape(E, 2 * I)  # the checkpoint's order
    assert torch.equal(prepared.tensors["b13"], b13) and torch.equal(prepared.tensors["b2"], w.b2)


@pytest.mark.parametrize("E,k,M", [(32, 4, 7), (40, 2, 300), (128, 4, 65)])
def test_real_routing_has_the_semantics_the_fake_models(E, k, M):
    """release/3.5.x routing_from_bitmatrix fed by qmoe's bitmatrix (under Triton's interpreter on a CPU)."""
    api = _real_api()
    if api.generation != "matmul_ogs":
        pytest.skip(f"the loaded triton_kernels is the {api.generation} generation")
    g = torch.Generator().manual_seed(M)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int16)
    ids[1, 0] = -1
    ids[M - 1] = -1
    w = torch.rand(M, k, generator=g).to(torch.bfloat16)
    ids, w = ids.to(DEV), w.to(DEV)
    routing, gather, scatter = api.routing(ids, w, E)
    flat = ids.reshape(-1).long()
    valid = flat >= 0
    n = int(valid.sum())
    order = torch.argsort(torch.where(valid, flat, E), stable=True)  # the fake's model
    assert torch.equal(routing.expt_hist, torch.bincount(flat[valid], minlength=E).int())
    assert torch.equal(gather.src_indx[:n].long(), order[:n]) and bool((gather.src_indx[n:] == -1).all())
    assert torch.equal(gather.dst_indx[order[:n]].long(), torch.arange(n, device=DEV))
    assert bool((gather.dst_indx[~valid] == -1).all())
    assert torch.equal(scatter.src_indx, gather.dst_indx) and torch.equal(scatter.dst_indx, gather.src_indx)
    assert torch.equal(routing.gate_scal[:n], torch.where(ids == -1, -1.0, w).reshape(-1)[order[:n]])


# --- GPU: the real kernels ---------------------------------------------------------------------------
def _gpu_ready(spec):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sup = BACKEND.supports(spec, "mxfp4", "cuda")
    if not sup.ok and ("not installed" in sup.reason or "SM90" in sup.reason):
        pytest.skip(sup.reason)
    assert sup.ok, sup.reason


def _graph_replay(prepared, x, ids, w, like):
    out = torch.full_like(like, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        BACKEND.forward(prepared, x, ids, w, out)
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["gpt-oss-120b", "gpt-oss-20b"])
def test_gpt_oss_on_gpu(preset):
    spec = qmoe.presets[preset]
    _gpu_ready(spec)
    weights = qmoe.weights.random_weights(spec, "mxfp4", "cuda", bias_std=0.5)
    prepared = BACKEND.prepare(spec, weights)
    g = torch.Generator(device="cuda").manual_seed(0)
    for M in (1, 4, 64, 1024):
        x = torch.randn(M, spec.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
        ids, w = qmoe.route(spec, torch.randn(M, spec.num_experts, generator=g, device="cuda"))
        out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
        assert BACKEND.forward(prepared, x, ids, w, out) is out
        ref = reference_moe(spec, weights, x, ids, w)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"M={M}: relative error {err:.2e}"
        if BACKEND.capturable:
            assert torch.equal(_graph_replay(prepared, x, ids, w, out), out), f"M={M}: graph replay != eager"


@pytest.mark.gpu
def test_gpu_empty_slots_zero_tokens_and_dtypes():
    spec = qmoe.presets["gpt-oss-20b"]
    _gpu_ready(spec)
    weights = qmoe.weights.random_weights(spec, "mxfp4", "cuda", bias_std=0.5)
    prepared = BACKEND.prepare(spec, weights)
    g = torch.Generator(device="cuda").manual_seed(1)
    M = 40
    x = torch.randn(M, spec.hidden_size, generator=g, device="cuda")
    ids, w = qmoe.route(spec, torch.randn(M, spec.num_experts, generator=g, device="cuda"))
    ids[3, 1] = -1
    ids[7] = -1  # a token with no expert on this rank: its row is the shared output
    shared = torch.randn(M, spec.hidden_size, generator=g, device="cuda")
    for dtype in (torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        out = torch.full((M, spec.hidden_size), float("nan"), dtype=dtype, device="cuda")
        BACKEND.forward(prepared, xd, ids, w, out, shared_output=shared)
        ref = reference_moe(spec, weights, xd, ids, w, shared)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
        assert torch.allclose(out[7].float(), shared[7], atol=5e-2)
    empty = torch.empty(0, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    assert BACKEND.forward(prepared, empty, ids[:0], w[:0], empty) is empty


@pytest.mark.gpu
def test_gpu_no_limit():
    spec = dataclasses.replace(qmoe.presets["gpt-oss-20b"], activation=qmoe.SwiGLU(1.702, 1.0, None))
    _gpu_ready(spec)
    weights = qmoe.weights.random_weights(spec, "mxfp4", "cuda", bias_std=0.5)
    prepared = BACKEND.prepare(spec, weights)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(16, spec.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    ids, w = qmoe.route(spec, torch.randn(16, spec.num_experts, generator=g, device="cuda"))
    out = torch.empty_like(x)
    BACKEND.forward(prepared, x, ids, w, out)
    ref = reference_moe(spec, weights, x, ids, w)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_module_imports_no_peer_at_qmoe_import():
    """Importing qmoe (and this backend's module) never imports triton_kernels or vllm."""
    code = ("import sys, qmoe, qmoe.backends.triton_kernels; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('triton_kernels', 'vllm')]; "
            "assert not bad, bad")
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
