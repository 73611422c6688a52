"""flashinfer_cutlass (SM90 MXFP4 W4A16) against fake FlashInfer generations, on the CPU."""

import dataclasses

import pytest
import torch

import fake_flashinfer as ff
import qmoe
from conftest import random_weights, small_spec
from fake_flashinfer.cases import moe_inputs, rel_err, run
from qmoe.backends.flashinfer import compat
from qmoe.backends.flashinfer import cutlass as flashinfer_cutlass
from qmoe.backends.flashinfer.cutlass import BACKEND

# H and I not multiples of 128: the backend must pad both and trim the output
SPEC = small_spec(E=4, k=2, H=160, I=96)
GOOD = ["0.6.16", "0.6.18.post1", "0.7.2"]


@pytest.fixture
def on_sm90(monkeypatch):
    monkeypatch.setattr(compat, "device_capability", lambda device: (9, 0))


@pytest.fixture(scope="module")
def weights():
    return random_weights(SPEC)


def test_name_and_registry():
    assert BACKEND.name == "flashinfer_cutlass"
    assert qmoe.backends.get_backend("flashinfer_cutlass") is BACKEND


@pytest.mark.parametrize("version", GOOD)
def test_matches_reference(monkeypatch, on_sm90, weights, version):
    fake = ff.install(monkeypatch, version)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert sup.ok and version in sup.reason
    out, err, prepared = run(BACKEND, SPEC, weights)
    assert err < 1e-2
    assert prepared.meta["flashinfer"] == compat.load()[0].fingerprint
    assert prepared.meta["hidden_padded"] == 256 and prepared.meta["intermediate_padded"] == 128
    assert fake.calls == [("cutlass_fused_moe", 6)]


def test_plain_silu_without_bias(monkeypatch, on_sm90):
    ff.install(monkeypatch, "0.6.18.post1")
    spec = small_spec(E=3, k=2, H=128, I=128, bias=False, activation=qmoe.SwiGLU())
    w = random_weights(spec, seed=3)
    out, err, prepared = run(BACKEND, spec, w, M=4)
    assert err < 1e-2
    assert "alpha" not in prepared.tensors and "b13" not in prepared.tensors


def test_one_bias_only_is_completed_with_zeros(monkeypatch, on_sm90, weights):
    ff.install(monkeypatch, "0.7.2")
    w = dataclasses.replace(weights, b2=None)
    out, err, prepared = run(BACKEND, SPEC, w)
    assert err < 1e-2
    assert prepared.tensors["b2"].dtype == torch.bfloat16 and not prepared.tensors["b2"].any()


def test_writes_into_out_without_padding(monkeypatch, on_sm90):
    ff.install(monkeypatch, "0.6.18.post1")
    spec = small_spec(E=2, k=1, H=128, I=128)
    w = random_weights(spec, seed=1)
    prepared = BACKEND.prepare(spec, w)
    x, ids, tw = moe_inputs(spec, 3)
    out = torch.full((3, 128), float("nan"), dtype=torch.bfloat16)
    ptr = out.data_ptr()
    assert BACKEND.forward(prepared, x, ids, tw, out) is out and out.data_ptr() == ptr
    assert rel_err(out, spec, w, x, ids, tw) < 1e-2


def test_missing_experts_and_shared_output(monkeypatch, on_sm90, weights):
    ff.install(monkeypatch, "0.6.18.post1")
    prepared = BACKEND.prepare(SPEC, weights)
    x, ids, w = moe_inputs(SPEC, 5, seed=2)
    ids[1, 0] = -1  # expert not on this rank: contributes nothing (the fake kernel rejects -1)
    ids[3] = -1
    shared = torch.randn(5, SPEC.hidden_size)
    out = torch.full((5, SPEC.hidden_size), float("nan"), dtype=torch.bfloat16)
    BACKEND.forward(prepared, x, ids, w, out, shared_output=shared)
    assert rel_err(out, SPEC, weights, x, ids, w, shared=shared) < 1e-2
    assert torch.allclose(out[3].float(), shared[3], atol=1e-2)


def test_zero_tokens_never_reach_the_kernel(monkeypatch, on_sm90, weights):
    fake = ff.install(monkeypatch, "0.6.18.post1")
    prepared = BACKEND.prepare(SPEC, weights)
    out = torch.empty(0, SPEC.hidden_size, dtype=torch.bfloat16)
    res = BACKEND.forward(prepared, torch.empty(0, SPEC.hidden_size, dtype=torch.bfloat16),
                          torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2), out)
    assert res is out and fake.calls == []


def test_fp32_activations_are_rounded_to_bf16(monkeypatch, on_sm90, weights):
    ff.install(monkeypatch, "0.6.18.post1")
    prepared = BACKEND.prepare(SPEC, weights)
    x, ids, w = moe_inputs(SPEC, 3)
    x = x.float() + 1e-3 * torch.randn(x.shape)  # not representable in bf16
    out = torch.full((3, SPEC.hidden_size), float("nan"))
    assert BACKEND.forward(prepared, x, ids, w, out) is out
    assert rel_err(out, SPEC, weights, x, ids, w) < 1e-2


def test_layout_made_under_another_version_is_refused(monkeypatch, on_sm90, weights):
    ff.install(monkeypatch, "0.6.16")
    old = BACKEND.prepare(SPEC, weights)
    ff.install(monkeypatch, "0.6.18.post1")
    x, ids, w = moe_inputs(SPEC, 2)
    out = torch.empty(2, SPEC.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"prepared: layout made under flashinfer 0\.6\.16, but flashinfer "
                                         r"0\.6\.18\.post1\+0f1e2d3c is loaded"):
        BACKEND.forward(old, x, ids, w, out)


def test_layouts_really_differ_between_generations(monkeypatch, on_sm90, weights):
    """Why the refusal matters: a 0.6.17 (gen 1) layout read by a 0.6.18 (gen 2) kernel is garbage."""
    ff.install(monkeypatch, "0.6.17")
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    old = BACKEND.prepare(SPEC, weights)
    ff.install(monkeypatch, "0.6.18.post1")
    old.meta["flashinfer"] = compat.load()[0].fingerprint  # defeat the check on purpose
    _, err, _ = run(BACKEND, SPEC, weights, prepared=old)
    assert err > 0.3


def test_wrong_row_order_is_caught(monkeypatch, on_sm90, weights):
    """A [gate; up] fc1 (qmoe's canonical order, not FlashInfer's) gives a wrong answer."""
    ff.install(monkeypatch, "0.6.18.post1")
    real_up_gate = compat.up_gate

    def keep_gate_up(t, rows, fill=0):  # pre-swapped halves, so the real step leaves [gate; up]
        i = t.shape[1] // 2
        return real_up_gate(torch.cat((t[:, i:], t[:, :i]), 1), rows, fill)
    monkeypatch.setattr(compat, "up_gate", keep_gate_up)
    _, err, _ = run(BACKEND, SPEC, weights)
    assert err > 0.3


def test_missing_padding_is_caught(monkeypatch, on_sm90, weights):
    ff.install(monkeypatch, "0.6.18.post1")
    monkeypatch.setattr(flashinfer_cutlass, "TILE", 64)  # 160 -> 192, not a multiple of 128
    # like the real package, the scale interleave (K/32 % 4) or the kernel (sizes % 128) refuses it
    with pytest.raises((ValueError, RuntimeError), match="interleave factor 4|padded to 128"):
        run(BACKEND, SPEC, weights)
    monkeypatch.setattr(flashinfer_cutlass, "TILE", 1)  # no padding at all: 96 intermediate rows
    with pytest.raises((ValueError, RuntimeError), match="interleave factor 4|padded to 128|divisible"):
        run(BACKEND, small_spec(E=4, k=2, H=128, I=96), random_weights(small_spec(E=4, k=2, H=128, I=96)))


@pytest.mark.parametrize("version", ["0.6.11", "0.6.17"])
def test_known_defect_needs_the_override(monkeypatch, on_sm90, weights, version):
    ff.install(monkeypatch, version)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "5438" in sup.reason and "QMOE_FLASHINFER_FORCE=1" in sup.reason
    with pytest.raises(ValueError, match="known defect"):
        BACKEND.prepare(SPEC, weights)
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert sup.ok and "forced" in sup.reason
    _, err, _ = run(BACKEND, SPEC, weights)  # gen 1 layout, older signature: still right
    assert err < 1e-2


@pytest.mark.parametrize("version", ["0.6.4", "0.6.8"])
def test_releases_without_the_sm90_helpers(monkeypatch, on_sm90, version):
    ff.install(monkeypatch, version)
    monkeypatch.setenv(compat.FORCE_ENV, "1")  # never overrides a missing function
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok
    assert f"flashinfer {version} has no flashinfer.fused_moe.interleave_moe_weights_for_sm90_mixed_gemm" in sup.reason


def test_reasons_for_device_format_and_install(monkeypatch):
    ff.install(monkeypatch, "0.6.18.post1")
    monkeypatch.setattr(compat, "device_capability", lambda device: None)
    assert "needs a CUDA GPU" in BACKEND.supports(SPEC, "mxfp4", "cpu").reason
    monkeypatch.setattr(compat, "device_capability", lambda device: (10, 0))
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "needs SM90 (Hopper); this GPU is SM100" in sup.reason and "flashinfer_trtllm" in sup.reason
    monkeypatch.setattr(compat, "device_capability", lambda device: (9, 0))
    assert "format nvfp4 is not offered" in BACKEND.supports(SPEC, "nvfp4", "cuda").reason
    monkeypatch.setitem(__import__("sys").modules, "flashinfer", None)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "flashinfer is not installed" in sup.reason


def test_real_capability_check_is_kept():
    # without a monkeypatched capability a CPU device is never an SM90 GPU
    assert compat.device_capability("cpu") is None
    assert not BACKEND.supports(SPEC, "mxfp4", "cpu").ok


def test_supports_never_raises(monkeypatch):
    ff.install(monkeypatch, "0.6.18.post1")

    def broken(device):
        raise RuntimeError("driver exploded")
    monkeypatch.setattr(compat, "device_capability", broken)
    sup = BACKEND.supports(SPEC, "mxfp4", "cuda")
    assert not sup.ok and "driver exploded" in sup.reason
