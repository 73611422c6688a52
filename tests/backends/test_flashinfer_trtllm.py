"""flashinfer_trtllm (SM100 MXFP4 / int4 W4A16, routed) against fake FlashInfer generations."""

import inspect
import sys

import pytest
import torch

import fake_flashinfer as ff
import qmoe
from conftest import random_weights, small_spec
from fake_flashinfer.cases import moe_inputs, rel_err, run
from qmoe.backends.flashinfer import compat
from qmoe.backends.flashinfer.trtllm import BACKEND

SPEC_FP4 = small_spec(E=4, k=2, H=160, I=96)               # padded to 256 / 128
SPEC_INT4 = small_spec(E=4, k=2, H=160, I=96, bias=False)  # padded to 256 / 256


@pytest.fixture
def on_sm100(monkeypatch):
    monkeypatch.setattr(compat, "device_capability", lambda device: (10, 0))


def forced(monkeypatch, version):
    fake = ff.install(monkeypatch, version)
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    return fake


def test_name_and_registry():
    assert BACKEND.name == "flashinfer_trtllm"
    assert qmoe.backends.get_backend("flashinfer_trtllm") is BACKEND


@pytest.mark.parametrize("version", ["0.6.18.post1", "0.7.2"])
def test_mxfp4_matches_reference(monkeypatch, on_sm100, version):
    fake = forced(monkeypatch, version)
    w = random_weights(SPEC_FP4)
    out, err, prepared = run(BACKEND, SPEC_FP4, w)
    assert err < 1e-2
    assert prepared.meta["routing_tuple"]  # (ids, fp32 weights) since 0.6.18
    assert prepared.tensors["s13"].dtype == torch.float8_e4m3fn and prepared.tensors["b13"].dtype == torch.float32
    assert fake.calls == [("trtllm_fp4_block_scale_routed_moe", 6)]


@pytest.mark.parametrize("version", ["0.6.18.post1", "0.7.2"])
def test_int4_matches_reference(monkeypatch, on_sm100, version):
    fake = forced(monkeypatch, version)
    w = random_weights(SPEC_INT4, "int4")
    out, err, prepared = run(BACKEND, SPEC_INT4, w)
    assert err < 1e-2  # routing weights travel packed as bf16
    assert prepared.meta["hidden_padded"] == 256 and prepared.meta["intermediate_padded"] == 256
    assert fake.calls == [("trtllm_mxint4_block_scale_routed_moe", 6)]


def test_mxfp4_packed_routing_when_no_tuple(monkeypatch, on_sm100):
    forced(monkeypatch, "0.6.18.post1")
    monkeypatch.delattr(sys.modules["flashinfer.fused_moe.core"], "_split_precomputed_routing")
    w = random_weights(SPEC_FP4, seed=2)
    _, err, prepared = run(BACKEND, SPEC_FP4, w)
    assert not prepared.meta["routing_tuple"] and err < 1e-2


def test_wrong_scale_shuffle_is_caught(monkeypatch, on_sm100):
    """int4 w2 scales use num_elts_per_sf=16 (not 32) in FlashInfer: a uniform 32 is wrong."""
    forced(monkeypatch, "0.6.18.post1")
    core = sys.modules["flashinfer.fused_moe.core"]
    orig = core.get_w2_permute_indices_with_cache

    def uniform_32(**kw):
        if kw.get("num_elts_per_sf"):
            kw["num_elts_per_sf"] = 32
        return orig(**kw)
    uniform_32.__signature__ = inspect.signature(orig)
    monkeypatch.setattr(core, "get_w2_permute_indices_with_cache", uniform_32)
    _, err, _ = run(BACKEND, SPEC_INT4, random_weights(SPEC_INT4, "int4"))
    assert err > 0.1


def test_not_yet_checked_paths_need_the_override(monkeypatch, on_sm100):
    ff.install(monkeypatch, "0.6.18.post1")
    for fmt, spec in (("mxfp4", SPEC_FP4), ("int4", SPEC_INT4)):
        sup = BACKEND.supports(spec, fmt, "cuda")
        assert not sup.ok and "not yet checked" in sup.reason and "QMOE_FLASHINFER_FORCE=1" in sup.reason
    with pytest.raises(ValueError, match="not yet checked"):
        BACKEND.prepare(SPEC_FP4, random_weights(SPEC_FP4))


@pytest.mark.parametrize("version,fmt,reason", [
    ("0.6.4", "int4", "has no flashinfer.fused_moe.trtllm_mxint4_block_scale_routed_moe"),
    ("0.6.11", "int4", "has no flashinfer.fused_moe.trtllm_mxint4_block_scale_routed_moe"),
    ("0.6.16", "int4", "documents no int4 x bf16 weight preparation"),
    ("0.6.17", "mxfp4", "documents no mxfp4 x bf16 weight preparation"),
    ("0.6.8", "mxfp4", "documents no mxfp4 x bf16 weight preparation")])
def test_releases_without_the_path(monkeypatch, on_sm100, version, fmt, reason):
    forced(monkeypatch, version)
    sup = BACKEND.supports(SPEC_FP4 if fmt == "mxfp4" else SPEC_INT4, fmt, "cuda")
    assert not sup.ok and reason in sup.reason


def test_reasons(monkeypatch):
    forced(monkeypatch, "0.7.2")
    monkeypatch.setattr(compat, "device_capability", lambda device: (9, 0))
    sup = BACKEND.supports(SPEC_FP4, "mxfp4", "cuda")
    assert not sup.ok and "SM10x or SM12x; this GPU is SM90" in sup.reason and "flashinfer_cutlass" in sup.reason
    monkeypatch.setattr(compat, "device_capability", lambda device: (12, 0))
    assert BACKEND.supports(SPEC_FP4, "mxfp4", "cuda").ok
    assert "W4A4" in BACKEND.supports(SPEC_FP4, "nvfp4", "cuda").reason
    assert "takes no biases" in BACKEND.supports(SPEC_FP4, "int4", "cuda").reason
    monkeypatch.setattr(compat, "device_capability", lambda device: None)
    assert "needs a CUDA GPU" in BACKEND.supports(SPEC_FP4, "mxfp4", "cpu").reason


def test_int4_refuses_weights_with_biases(monkeypatch, on_sm100):
    forced(monkeypatch, "0.7.2")
    with pytest.raises(ValueError, match="weights: trtllm_mxint4_block_scale_routed_moe takes no biases"):
        BACKEND.prepare(SPEC_INT4, random_weights(SPEC_INT4, "int4", bias=True))


def test_zero_tokens_and_version_refusal(monkeypatch, on_sm100):
    fake = forced(monkeypatch, "0.6.18.post1")
    w = random_weights(SPEC_INT4, "int4")
    prepared = BACKEND.prepare(SPEC_INT4, w)
    out = torch.empty(0, SPEC_INT4.hidden_size, dtype=torch.bfloat16)
    BACKEND.forward(prepared, torch.empty(0, SPEC_INT4.hidden_size, dtype=torch.bfloat16),
                    torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2), out)
    assert fake.calls == []
    forced(monkeypatch, "0.7.2")
    x, ids, tw = moe_inputs(SPEC_INT4, 2)
    with pytest.raises(ValueError, match="prepare the weights again"):
        BACKEND.forward(prepared, x, ids, tw, torch.empty(2, SPEC_INT4.hidden_size, dtype=torch.bfloat16))


def test_missing_experts(monkeypatch, on_sm100):
    forced(monkeypatch, "0.7.2")
    w = random_weights(SPEC_FP4, seed=4)
    prepared = BACKEND.prepare(SPEC_FP4, w)
    x, ids, tw = moe_inputs(SPEC_FP4, 4, seed=5)
    ids[0, 1] = -1
    out = torch.full((4, SPEC_FP4.hidden_size), float("nan"), dtype=torch.bfloat16)
    BACKEND.forward(prepared, x, ids, tw, out)
    assert rel_err(out, SPEC_FP4, w, x, ids, tw) < 1e-2
