"""flashinfer_cutedsl (SM100 NVFP4 W4A16) against fake FlashInfer generations."""

import pytest
import torch

import fake_flashinfer as ff
import qmoe
from conftest import random_weights, small_spec
from fake_flashinfer.cases import run
from qmoe.backends.flashinfer import compat
from qmoe.backends.flashinfer.cutedsl import BACKEND

SPEC = small_spec(E=4, k=2, H=160, I=96, bias=False)


@pytest.fixture
def on_sm100(monkeypatch):
    monkeypatch.setattr(compat, "device_capability", lambda device: (10, 0))


def test_name_and_registry():
    assert BACKEND.name == "flashinfer_cutedsl"
    assert qmoe.backends.get_backend("flashinfer_cutedsl") is BACKEND


@pytest.mark.parametrize("version", ["0.6.18.post1", "0.7.2"])
@pytest.mark.parametrize("activation", [None, qmoe.SwiGLU()])
def test_matches_reference(monkeypatch, on_sm100, version, activation):
    fake = ff.install(monkeypatch, version, cutlass_dsl=True)
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    spec = SPEC if activation is None else small_spec(E=4, k=2, H=160, I=96, bias=False, activation=activation)
    w = random_weights(spec, "nvfp4")
    out, err, prepared = run(BACKEND, spec, w)
    assert err < 1e-2
    assert torch.equal(prepared.tensors["alpha13"], w.w13.global_scale)
    assert fake.calls == [("cute_dsl_fused_moe_nvfp4", 6)]


def test_wrong_row_order_is_caught(monkeypatch, on_sm100):
    ff.install(monkeypatch, "0.7.2", cutlass_dsl=True)
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    real_up_gate = compat.up_gate

    def keep_gate_up(t, rows, fill=0):
        i = t.shape[1] // 2
        return real_up_gate(torch.cat((t[:, i:], t[:, :i]), 1), rows, fill)
    monkeypatch.setattr(compat, "up_gate", keep_gate_up)
    _, err, _ = run(BACKEND, SPEC, random_weights(SPEC, "nvfp4"))
    assert err > 0.3


def test_reasons(monkeypatch, on_sm100):
    ff.install(monkeypatch, "0.6.18.post1", cutlass_dsl=False)
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    assert "nvidia-cutlass-dsl is not installed" in BACKEND.supports(SPEC, "nvfp4", "cuda").reason
    ff.install(monkeypatch, "0.6.16", cutlass_dsl=True)
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    sup = BACKEND.supports(SPEC, "nvfp4", "cuda")
    assert not sup.ok and "has no parameter quant_mode" in sup.reason
    ff.install(monkeypatch, "0.7.2", cutlass_dsl=True)
    sup = BACKEND.supports(SPEC, "nvfp4", "cuda")
    assert not sup.ok and "not yet checked" in sup.reason
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    assert "takes no biases" in BACKEND.supports(small_spec(bias=True), "nvfp4", "cuda").reason
    assert "format mxfp4 is not offered" in BACKEND.supports(SPEC, "mxfp4", "cuda").reason
    monkeypatch.setattr(compat, "device_capability", lambda device: (9, 0))
    assert "needs SM100 or SM103; this GPU is SM90" in BACKEND.supports(SPEC, "nvfp4", "cuda").reason


def test_refuses_weights_with_biases(monkeypatch, on_sm100):
    ff.install(monkeypatch, "0.7.2", cutlass_dsl=True)
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    with pytest.raises(ValueError, match="weights: cute_dsl_fused_moe_nvfp4 takes no biases"):
        BACKEND.prepare(SPEC, random_weights(SPEC, "nvfp4", bias=True))
