"""The `qmoe` command line: env, demo, and the wiring of commands."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import qmoe
from qmoe import FORMATS, presets
from qmoe.backends import BACKEND_NAMES, Prepared, Support
from qmoe.backends.base import Backend
from qmoe.cli import COMMANDS, main
from qmoe.cli.demo import scaled_down
from qmoe.cli.env import package_version
from qmoe.weights import random_weights

SRC = str(Path(qmoe.__file__).resolve().parents[1])


def run_qmoe(*args, timeout=120):
    """`python -m qmoe ARGS` in a fresh process (sees src/ even without an install)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "160"  # rich wraps tables to 80 columns when not on a terminal
    env.pop("TRITON_INTERPRET", None)  # the demo must set it by itself on CPU
    return subprocess.run([sys.executable, "-m", "qmoe", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def env_json(capsys):
    assert main(["env", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- qmoe env ---------------------------------------------------------------------------------

def test_env_json_names_every_backend_with_a_reason_per_format(capsys):
    info = env_json(capsys)
    for key in ("python", "torch", "triton", "flashinfer", "gpu", "backends"):
        assert key in info
    assert info["torch"] == torch.__version__
    if torch.cuda.is_available():
        assert re.fullmatch(r"\d+\.\d+", info["gpu"]["compute_capability"])
    else:
        assert info["gpu"] == "none"
    assert list(info["backends"]) == list(BACKEND_NAMES)
    for name, b in info["backends"].items():
        assert list(b["formats"]) == list(FORMATS), name
        for fmt, s in b["formats"].items():
            assert isinstance(s["usable"], bool), (name, fmt)
            assert isinstance(s["reason"], str) and s["reason"].strip(), (name, fmt)
    assert all(s["usable"] for s in info["backends"]["reference"]["formats"].values())
    assert info["backends"]["reference"]["capturable"] is False
    assert info["backends"]["triton"]["capturable"] is True and info["backends"]["triton"]["tunable"] is True
    # which routing MoE.__call__ runs here, and why
    assert info["routing"]["fused"] == (torch.cuda.is_available() and info["triton"] != "not installed")
    assert info["routing"]["reason"].strip()
    if not torch.cuda.is_available():
        assert "reference routing in PyTorch" in info["routing"]["reason"]


def test_package_versions_are_found_without_importing(tmp_path, monkeypatch):
    # a module that would fail if imported, with and without installed metadata
    (tmp_path / "qmoe_fake_fi").mkdir()
    (tmp_path / "qmoe_fake_fi" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_version("qmoe-fake-fi", "qmoe_fake_fi") == "installed (version unknown)"
    meta = tmp_path / "qmoe_fake_fi-0.6.18.post1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: qmoe-fake-fi\nVersion: 0.6.18.post1\n")
    assert package_version("qmoe-fake-fi", "qmoe_fake_fi") == "0.6.18.post1"
    assert package_version("qmoe-absent-dist", "qmoe_absent_module") == "not installed"
    assert "qmoe_fake_fi" not in sys.modules


def _fake_module(name, backend):
    mod = types.ModuleType(name)
    mod.BACKEND = backend
    return mod


def test_env_survives_a_backend_that_fails_to_import_or_raises(capsys, monkeypatch):
    def explode(name):  # what a backend module raising at import time looks like to get_backend
        raise RuntimeError("libcuda.so not found")

    from qmoe.cli import common

    real = common.load_backend
    monkeypatch.setattr("qmoe.cli.env.load_backend", lambda name: explode(name) if name == "triton" else real(name))

    class Raising(Backend):
        name = "flashinfer_trtllm"
        formats = FORMATS

        def _supports(self, spec, fmt, device):
            raise KeyError("sm_100a")

    monkeypatch.setitem(sys.modules, "qmoe.backends.flashinfer.trtllm", _fake_module("x", Raising()))
    info = env_json(capsys)
    for s in info["backends"]["triton"]["formats"].values():
        assert not s["usable"]
        assert "RuntimeError" in s["reason"] and "libcuda.so not found" in s["reason"]
    for s in info["backends"]["flashinfer_trtllm"]["formats"].values():
        assert not s["usable"] and s["reason"] == "probing flashinfer_trtllm failed: KeyError: 'sm_100a'"
    assert all(s["usable"] for s in info["backends"]["reference"]["formats"].values())


def test_env_human_output_lists_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in BACKEND_NAMES:
        assert name in out
    assert "torch" in out and torch.__version__ in out


def test_python_dash_m_qmoe_env_in_a_subprocess():
    p = run_qmoe("env", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert list(info["backends"]) == list(BACKEND_NAMES)


# --- qmoe demo --------------------------------------------------------------------------------

def test_demo_on_cpu_prints_a_table_with_the_reference_error():
    # all backends: on CPU the triton backend runs under the interpreter the demo switches on
    p = run_qmoe("demo", "--tokens", "3", "--dtype", "float32", "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    row = re.search(r"reference\s*[│|]\s*([0-9.e+-]+)\s*[│|]\s*yes", p.stdout)
    assert row, p.stdout
    assert float(row.group(1)) < 1e-5
    assert "E=8, top_k=4, H=256, I=256" in p.stdout  # the scaled-down gpt-oss-120b layer


def test_demo_json_reference_matches_float64(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what the demo sets on CPU; restored after the test
    rc = main(["demo", "--tokens", "5", "--dtype", "float32", "--device", "cpu", "--backend", "reference",
               "--preset", "deepseek-v3", "--format", "nvfp4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["scaled_down"] and out["spec"]["top_k"] == 8 and out["spec"]["routing"] == "sigmoid_grouped"
    (row,) = out["backends"]
    assert row["backend"] == "reference" and row["usable"] and row["ok"]
    assert row["rel_error"] < 1e-5
    assert row["time_us"] > 0


class _Forgetful(Backend):
    """A backend that runs without error but never writes its output."""

    name = "triton"
    formats = FORMATS

    def _supports(self, spec, fmt, device):
        return Support(True, "fake backend for the test")

    def _prepare(self, spec, weights):
        return Prepared(self.name, spec, weights.format, weights.device)

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        return out


def test_demo_flags_a_backend_that_leaves_its_output_unwritten(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after the test (the demo would set it)
    monkeypatch.setitem(sys.modules, "qmoe.backends.triton", _fake_module("qmoe.backends.triton", _Forgetful()))
    rc = main(["demo", "--tokens", "4", "--device", "cpu", "--backend", "reference", "--backend", "triton",
               "--json"])
    rows = {r["backend"]: r for r in json.loads(capsys.readouterr().out)["backends"]}
    assert rc == 1
    assert rows["triton"]["usable"] and rows["triton"]["ok"] is False and "NaN" in rows["triton"]["reason"]
    assert rows["reference"]["ok"] and rows["reference"]["rel_error"] < 1e-2  # bf16 output rounding


@pytest.mark.parametrize("name", list(presets))
def test_scaled_down_presets_are_valid_and_keep_the_model_s_math(name):
    full = presets[name]
    small = scaled_down(full)  # MoESpec validates routing groups against top_k on construction
    assert small.hidden_size == small.intermediate_size == 256
    assert small.top_k == full.top_k and small.activation == full.activation and small.routing == full.routing
    assert 2 * small.top_k <= small.num_experts <= 16
    assert small.num_experts % full.routing.n_group == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_demo_weights_are_quantized_per_spec(fmt):
    spec = scaled_down(presets["gpt-oss-20b"])
    w = random_weights(spec, fmt, torch.device("cpu"), seed=3)
    assert w.format == fmt and w.w13.shape == (8, 512, 256) and w.w2.shape == (8, 256, 256)
    assert w.b13 is not None and w.b2 is not None  # GPT-OSS has biases
    w13, w2 = w.dequantize_expert(7)
    for t in (w13, w2):
        assert 0.055 < t.std().item() < 0.07  # N(0, 1/K), K = 256, through 4-bit rounding
    other = random_weights(spec, fmt, torch.device("cpu"), seed=4)
    assert not torch.equal(w.w13.data, other.w13.data)


# --- command wiring and bad options ------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["demo", "--tokens", "0"], "argument --tokens: expected an integer >= 1, got '0'"),
    (["demo", "--tokens", "x"], "argument --tokens: expected an integer >= 1, got 'x'"),
    (["bench", "--reps", "0"], "argument --reps: expected an integer >= 1, got '0'"),
    (["bench", "--tokens", "4,-1"], "--tokens: expected comma-separated integers >= 1, got '4,-1'"),
    (["bench", "--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["bench", "--backend", "triton,nope"], "--backend: expected one of reference, triton"),
    (["tune", "--max-seconds", "0"], "argument --max-seconds: expected a number > 0, got '0'"),
    (["tune", "--max-seconds", "nan"], "argument --max-seconds: expected a number > 0, got 'nan'"),
    (["check", "--timeout", "-1"], "argument --timeout: expected a number > 0, got '-1'"),
    (["check", "--max-restarts", "x"], "argument --max-restarts: expected an integer >= 0, got 'x'"),
    (["check", "--backend", "tritonn"], "--backend: expected one of"),
    (["check", "--tokens", "a"], "--tokens: expected comma-separated integers >= 0, got 'a'"),
    (["demo", "--preset", "llama"], "invalid choice"),
    (["demo", "--format", "fp8"], "invalid choice"),
    (["demo", "--backend", "cublas"], "invalid choice"),
    (["env", "--yaml"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_options_exit_non_zero_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_demo_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["demo", "--device", "cuda"]) == 2
    assert "--device" in capsys.readouterr().err


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "env" in capsys.readouterr().out


def test_missing_or_broken_command_module_fails_alone(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(COMMANDS, "bench", ("qmoe._no_such_module", "missing"))
    (tmp_path / "qmoe_broken_cmd.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "tune", ("qmoe_broken_cmd", "broken"))

    assert main(["bench"]) == 2
    assert "not available in this build" in capsys.readouterr().err
    assert main(["tune", "--help"]) == 2
    err = capsys.readouterr().err
    assert "failed to load" in err and "half-written module" in err
    assert main(["env", "--json"]) == 0  # the others still work
    assert "backends" in json.loads(capsys.readouterr().out)
