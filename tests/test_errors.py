"""The error contract, as a table: every bad input is a ValueError that names the argument,
says what was expected and what was given (the README promises it). Each row was a crash, a
different exception or a silent acceptance before."""

import json

import pytest
import torch

import qmoe
from conftest import random_weights, small_spec


def _spec(**kw):
    return qmoe.MoESpec(4, 2, 64, 32, **kw)


def _gpt_oss_file(tmp_path):
    spec = small_spec(E=4, k=2, H=64, I=64)
    w = random_weights(spec, "mxfp4")
    path = tmp_path / "ckpt.safetensors"
    qmoe.save_gpt_oss(path, {0: (w, torch.randn(4, 64), torch.randn(4))})
    return path


def _truncated(tmp_path):
    path = _gpt_oss_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    return path


def _broken_index(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    return folder


def _index_missing_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    return folder


CASES = [
    ("quantize with a list as format", lambda t: qmoe.quantize(torch.randn(4, 32), ["mxfp4"]),
     r"format: expected one of mxfp4, nvfp4, int4, bf16, got \['mxfp4'\]"),
    ("quantize an int tensor", lambda t: qmoe.quantize(torch.ones(4, 32, dtype=torch.int32), "mxfp4"),
     "x: expected a floating-point tensor, got torch.int32"),
    ("SwiGLU alpha a string", lambda t: qmoe.SwiGLU(alpha="1.7"), "SwiGLU.alpha: expected a finite number, got '1.7'"),
    ("SwiGLU limit a string", lambda t: qmoe.SwiGLU(limit="7"), "SwiGLU.limit: expected None or a finite positive"),
    ("SwiGLU beta inf", lambda t: qmoe.SwiGLU(beta=float("inf")), "SwiGLU.beta: expected a finite number"),
    ("Routing renormalize 1", lambda t: qmoe.Routing(renormalize=1), "Routing.renormalize: expected True or False"),
    ("Routing scaling a string", lambda t: qmoe.Routing(routed_scaling_factor="2"),
     "Routing.routed_scaling_factor: expected a positive number, got '2'"),
    ("Routing n_group a float", lambda t: qmoe.Routing("sigmoid_grouped", n_group=2.0),
     "Routing.n_group: expected a positive int, got 2.0"),
    ("Routing groups for softmax", lambda t: qmoe.Routing("softmax", n_group=4),
     "Routing.n_group: softmax routing has no expert groups"),
    ("MoESpec bias 1", lambda t: _spec(bias=1), "MoESpec.bias: expected True or False, got 1"),
    ("MoESpec name 3", lambda t: _spec(name=3), "MoESpec.name: expected a string, got 3"),
    ("load_gpt_oss truncated", lambda t: qmoe.load_gpt_oss(_truncated(t), 0),
     r"checkpoint: .*ckpt.safetensors (is not a readable safetensors file|cannot be read)"),
    ("load_gpt_oss garbage", lambda t: qmoe.load_gpt_oss(_garbage(t), 0),
     "checkpoint: .*x.safetensors is not a readable safetensors file"),
    ("load_gpt_oss broken index", lambda t: qmoe.load_gpt_oss(_broken_index(t), 0),
     "checkpoint: index .*model.safetensors.index.json is not a JSON object with a weight_map"),
    ("load_gpt_oss index naming a missing file", lambda t: qmoe.load_gpt_oss(_index_missing_file(t), 0),
     "checkpoint: index .* names gone.safetensors, which is not in"),
    ("load_gpt_oss layer -1", lambda t: qmoe.load_gpt_oss(_gpt_oss_file(t), -1),
     "layer: expected a layer index"),
    ("save_gpt_oss a pair instead of a triple", lambda t: qmoe.save_gpt_oss(
        t / "o.safetensors", {0: (random_weights(small_spec()), torch.randn(4, 64))}),
     r"layers\[0\]: expected \(weights, router_weight, router_bias\), got tuple of 2"),
    ("save_gpt_oss a list of layers", lambda t: qmoe.save_gpt_oss(t / "o.safetensors", []),
     "layers: expected {layer index: "),
    ("MoE with spec.bias disagreeing with the weights", lambda t: qmoe.MoE(
        small_spec(bias=False), random_weights(small_spec(bias=True))),
     "weights: spec small says bias=False, but the weights have biases"),
    ("MoE check_ids 1", lambda t: qmoe.MoE(small_spec(), random_weights(small_spec()), check_ids=1),
     "check_ids: expected True, False or 'raise', got 1"),
    ("MoE backend None", lambda t: qmoe.MoE(small_spec(), random_weights(small_spec()), backend=None),
     "backend: expected 'auto' or a backend name, got None"),
    ("route with a string spec", lambda t: qmoe.route("gpt-oss-20b", torch.randn(2, 32)),
     "spec: expected a MoESpec, got str"),
]


@pytest.mark.parametrize("what, call, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_value_error_naming_the_argument(tmp_path, what, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path)


def test_empty_inputs_are_fine():
    for fmt in ("mxfp4", "nvfp4", "int4"):
        q = qmoe.quantize(torch.empty(0, 4, 32), fmt)
        assert q.shape == (0, 4, 32) and qmoe.dequantize(q).shape == (0, 4, 32)
        q = qmoe.quantize(torch.empty(0, 32), fmt)
        assert qmoe.dequantize(q).shape == (0, 32)


class _PureBackend(qmoe.backends.Backend):
    """Tensor ops only (no host sync), bad ids not handled: what a peer kernel looks like."""

    name, formats = "pure", qmoe.FORMATS
    seen = []

    def _supports(self, spec, fmt, device):
        return qmoe.backends.Support(True, "test backend")

    def _prepare(self, spec, weights):
        return qmoe.backends.Prepared(self.name, spec, weights.format, weights.device)

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        self.seen.append(topk_ids.clone())
        return out.copy_(x * 0 + topk_ids.float().sum(dim=1, keepdim=True))


def test_check_ids_raise_names_the_values():
    spec = small_spec()
    ids = torch.tensor([[0, 1], [2, 9], [-1, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"topk_ids: expected values in \[-1, 4\), got values in \[-1, 9\]"):
        qmoe.MoE(spec, random_weights(spec), backend="reference", check_ids="raise").experts(
            torch.randn(3, spec.hidden_size), ids, torch.full((3, 2), 0.5))


def test_default_check_ids_poisons_bad_rows_on_the_device_without_a_host_sync(monkeypatch):
    """check_ids=True (the default) used to sync with the host twice per call (min, max); now a
    device-side guard turns bad ids into -1 for the backend and NaNs their rows after it."""
    from qmoe.dispatch import plan as plan_module

    spec = small_spec()
    pure = _PureBackend()
    monkeypatch.setattr(plan_module, "get_backend", lambda name: pure)
    moe = qmoe.MoE(spec, random_weights(spec), backend="pure")
    x = torch.randn(3, spec.hidden_size)
    ids = torch.tensor([[0, 1], [2, 9], [-1, -5]], dtype=torch.int32)
    w = torch.full((3, 2), 0.5)
    moe.experts(x, ids, w)  # first call: resolves the plan's runner for M=3

    def no_sync(*a, **k):
        raise AssertionError("a host sync in the hot path")

    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    out = moe.experts(x, ids, w)
    monkeypatch.undo()
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all() and torch.isfinite(out[0]).all()
    assert pure.seen[-1].tolist() == [[0, 1], [2, -1], [-1, -1]]  # the backend saw bad ids as "no expert"


def test_bench_on_a_cpu_scales_down_and_shows_progress_when_not_a_terminal(capsys):
    from qmoe.cli import main

    assert main(["bench", "--tokens", "2", "--backend", "reference", "--reps", "1", "--no-check"]) == 0
    err, out = capsys.readouterr()[::-1]
    assert "scaled-down shapes" in err and "qmoe bench [1/1]" in err
    assert "gpt-oss-120b mxfp4 (scaled down)" in out
