"""The FlashInfer compat module: versions and the known-defect table, probing, keyword-only
calls, return normalization, layout stamping, logging, and the layout steps' inverses."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import fake_flashinfer as ff
from qmoe.backends.base import finish_output
from qmoe.backends.flashinfer import compat
from qmoe.backends.flashinfer.trtllm import pack_topk, unpack_topk


def test_version_order_follows_pep440():
    order = ["0.6.9", "0.6.10.dev3", "0.6.10rc1", "0.6.10", "0.6.10.post1", "0.6.11", "0.6.16",
             "0.6.16.post3", "0.6.17", "0.6.18", "0.6.18.post1", "0.7.0", "0.7.2.post1", "1.0"]
    keys = [compat.version_key(v) for v in order]
    assert keys == sorted(keys)
    assert compat.version_key("0.6.18+cu129") == compat.version_key("0.6.18")
    assert compat.version_key("nightly") is None


@pytest.mark.parametrize("version,broken", [
    ("0.6.9", False), ("0.6.10", True), ("0.6.12", True), ("0.6.15.post1", True), ("0.6.16", False),
    ("0.6.16.post2", False), ("0.6.16.post3", True), ("0.6.16.post4", True), ("0.6.17", True),
    ("0.6.18", False), ("0.6.18.post1", False), ("0.7.2", False)])
def test_known_defect_table(version, broken):
    why = compat.known_defect("cutlass_sm90_w4a16", version)
    assert (why is not None) == broken
    if broken:
        assert "5438" in why and version in why
    assert compat.known_defect("trtllm_mxfp4_w4a16", version) is None


def test_unparseable_version_is_refused():
    assert "unrecognized FlashInfer version" in compat.known_defect("cutlass_sm90_w4a16", "weird-build")


def test_gate_needs_the_override(monkeypatch):
    ff.isolate(monkeypatch)
    assert compat.gate("cutlass_sm90_w4a16", "0.6.18.post1") == (True, "")
    ok, note = compat.gate("cutlass_sm90_w4a16", "0.6.12")
    assert not ok and "QMOE_FLASHINFER_FORCE=1" in note
    ok, note = compat.gate("trtllm_int4_w4a16", "0.6.18.post1")
    assert not ok and "not yet checked" in note
    monkeypatch.setenv(compat.FORCE_ENV, "1")
    ok, note = compat.gate("cutlass_sm90_w4a16", "0.6.12")
    assert ok and "forced" in note and "5438" in note
    monkeypatch.setenv(compat.FORCE_ENV, "yes")  # only "1" forces
    assert not compat.gate("cutlass_sm90_w4a16", "0.6.12")[0]


def test_importing_qmoe_never_imports_flashinfer():
    code = ("import sys, qmoe, qmoe.backends.flashinfer.cutlass, qmoe.backends.flashinfer.trtllm, "
            "qmoe.backends.flashinfer.cutedsl; print('flashinfer' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_not_installed(monkeypatch):
    ff.isolate(monkeypatch)
    for name in [n for n in sys.modules if n.startswith("flashinfer.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # makes `import flashinfer` fail as if absent
    fi, why = compat.load()
    assert fi is None
    assert "not installed" in why and "qmoe[flashinfer]" in why


def test_probe_follows_the_installed_generation(monkeypatch):
    ff.install(monkeypatch, "0.6.4")
    fi, _ = compat.load()
    assert fi.version == "0.6.4" and fi.fingerprint == "0.6.4"
    assert "interleave_moe_weights_for_sm90_mixed_gemm" in fi.missing(
        "flashinfer.fused_moe", "interleave_moe_weights_for_sm90_mixed_gemm")
    assert "workspace_buffer" in fi.missing("flashinfer.fused_moe", "cutlass_fused_moe", ("workspace_buffer",))
    ff.install(monkeypatch, "0.7.2")  # a new module object: probed afresh
    fi, _ = compat.load()
    assert fi.fingerprint == "0.7.2+a1b2c3d4"
    assert fi.missing("flashinfer.fused_moe", "cutlass_fused_moe", ("workspace_buffer", "backend")) is None
    assert fi.get("flashinfer.no_such_module", "x") is None


def test_call_is_keyword_only_and_drops_unknown_optionals(monkeypatch):
    ff.install(monkeypatch, "0.6.8")
    fi, _ = compat.load()
    sizes = fi.call("flashinfer.fused_moe.core", "convert_to_block_layout",
                    {"input_tensor": torch.zeros(4, 256, dtype=torch.uint8), "blockK": 128},
                    optional={"not_in_this_release": 1}).shape
    assert tuple(sizes) == (2, 4, 128)
    with pytest.raises(RuntimeError, match="has no parameter workspace_buffer"):
        fi.call("flashinfer.fused_moe", "cutlass_fused_moe", {"workspace_buffer": None})
    with pytest.raises(AssertionError, match="positional"):  # the fakes catch positional calls
        fi.get("flashinfer.fused_moe.core", "convert_to_block_layout")(torch.zeros(4, 256), 128)


def test_returns_are_normalized():
    t = torch.arange(6.0).reshape(2, 3)
    assert compat.first_tensor(t, "op") is t
    assert compat.first_tensor([t, torch.zeros(1)], "op") is t
    assert compat.first_tensor((t,), "op") is t
    with pytest.raises(RuntimeError, match="returned NoneType"):
        compat.first_tensor(None, "op")
    with pytest.raises(RuntimeError, match="returned list"):
        compat.first_tensor([], "op")


def test_the_result_is_copied_only_when_needed():
    out = torch.full((2, 3), float("nan"))
    padded = torch.arange(10.0).reshape(2, 5)
    assert finish_output(out, compat.first_tensor([padded], "op")) is out
    assert torch.equal(out, padded[:, :3])
    same = torch.zeros(2, 3)
    finish_output(same, compat.first_tensor(same, "op"))  # the op wrote into out itself: nothing to copy
    assert torch.equal(same, torch.zeros(2, 3))


def test_routable_masks_missing_experts():
    ids = torch.tensor([[3, -1], [-1, -1]])
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    i2, w2 = compat.routable(ids, w)
    assert i2.dtype == torch.int32 and w2.dtype == torch.float32
    assert i2.tolist() == [[3, 0], [0, 0]]
    assert torch.allclose(w2, torch.tensor([[0.7, 0.0], [0.0, 0.0]]))


def test_up_gate_round_trip():
    E, I, rows = 3, 5, 8
    t = torch.arange(E * 2 * I * 4).reshape(E, 2 * I, 4)
    ug = compat.up_gate(t, rows, fill=-1)
    assert ug.shape == (E, 2 * rows, 4)
    assert torch.equal(ug[:, :I], t[:, I:]) and torch.equal(ug[:, rows:rows + I], t[:, :I])
    assert (ug[:, I:rows] == -1).all() and (ug[:, rows + I:] == -1).all()
    assert torch.equal(compat.gate_up(ug, I), t)


def test_pad_helpers():
    t = torch.ones(2, 3, 5)
    p = compat.pad_last2(t, 4, 8, fill=7)
    assert p.shape == (2, 4, 8) and torch.equal(p[:, :3, :5], t) and (p[:, 3:] == 7).all()
    assert compat.padded(2880, 128) == 2944 and compat.padded(256, 128) == 256
    x = torch.randn(3, 5)
    assert compat.pad_cols(x, 5) is x
    assert torch.equal(compat.pad_cols(x, 8)[:, :5], x) and (compat.pad_cols(x, 8)[:, 5:] == 0).all()


def test_pack_topk_round_trip():
    ids = torch.tensor([[0, 127], [5, 1]], dtype=torch.int32)
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    packed = pack_topk(ids, w)
    assert packed.dtype == torch.int32
    assert packed[0, 1].item() >> 16 == 127
    i2, w2 = unpack_topk(packed)
    assert torch.equal(i2, ids) and torch.equal(w2, w)  # these weights are exact in bf16


def test_logging_stays_at_warning(monkeypatch):
    ff.install(monkeypatch, "0.6.11")  # 0.6.11 shipped with debug logging
    assert logging.getLogger("flashinfer.jit").level == logging.DEBUG
    compat.load()
    assert logging.getLogger("flashinfer.jit").level == logging.WARNING
    assert os.environ["FLASHINFER_LOGGING_LEVEL"] == "WARNING"


def test_logging_left_alone_when_the_user_asks(monkeypatch):
    ff.install(monkeypatch, "0.6.11")
    monkeypatch.setenv("FLASHINFER_LOGGING_LEVEL", "DEBUG")
    compat.load()
    assert logging.getLogger("flashinfer.jit").level == logging.DEBUG


def test_routable_spare_gives_each_dropped_slot_its_own_spare_expert():
    """FlashInfer's SM90 MoE goes wrong when a token names an expert twice, so -1 slots go to
    spare experts E + j (weight 0), never to a real or repeated expert."""
    from qmoe.backends.flashinfer import compat
    ids = torch.tensor([[3, -1, 5, -1], [-1, -1, -1, -1], [0, 1, 2, 3]])
    w = torch.rand(3, 4)
    got_ids, got_w = compat.routable_spare(ids, w, 8)
    assert got_ids.dtype == torch.int32 and got_w.dtype == torch.float32
    assert got_ids.tolist() == [[3, 9, 5, 11], [8, 9, 10, 11], [0, 1, 2, 3]]
    assert torch.equal(got_w, torch.where(ids < 0, 0.0, w))
    assert all(len(set(r)) == 4 for r in got_ids.tolist())
