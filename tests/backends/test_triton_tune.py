"""Kernel-config tuning of the triton backend, run through `qmoe tune --kernels` (interpreter on
a CPU): the winners land in the user's table, and prepare() then launches with them."""

import argparse
import json

import torch

import qmoe
from qmoe.backends import get_backend
from qmoe.backends.triton import configs
from qmoe.cli import tune
from qmoe.kernels.moe import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_tune_kernels_writes_the_table_and_prepare_uses_it(tmp_path, monkeypatch):
    table = tmp_path / "triton_configs.json"
    monkeypatch.setenv("QMOE_TRITON_CONFIGS", str(table))
    only = KernelConfig(16, 32, 32, False, 2, 2, 1)
    monkeypatch.setattr(configs, "candidates", lambda m, k, e, fmt="mxfp4": [configs.default_config(m, k, e, fmt), only])
    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    args = parser.parse_args(["--experts", "4", "--hidden", "64", "--intermediate", "64", "--top-k", "2",
                              "--format", "mxfp4", "--backend", "triton", "--kernels", "--tokens", "3",
                              "--reps", "2", "--warmup", "0", "--allow-cpu", "--device", DEVICE,
                              "--tuning-file", str(tmp_path / "tuning.json")])
    assert tune.run(args) == 0
    saved = json.loads(table.read_text())
    assert saved["kind"] == "qmoe-triton-configs" and saved["schema"] == 2
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    entries = {("batch-invariant" in k): e for k, e in saved["entries"].items()}
    assert len(saved["entries"]) == 2 and set(entries) == {True, False}  # both modes' winners
    for key in saved["entries"]:
        assert key.startswith(f"{gpu}|mxfp4|E4 H64 I64 k2|") and f"triton {configs.versions()['triton']}" in key
    assert all(set(e["buckets"]) == {"3"} for e in entries.values())  # the tuned M is a bucket of its own
    assert configs.invariant(KernelConfig(**entries[True]["buckets"]["3"]))
    entry = entries[False]  # the backend's default mode (batch invariance is a switch)
    winner = KernelConfig(**entry["buckets"]["3"])
    assert winner in (configs.default_config(3, 2, 4), only)

    spec = qmoe.MoESpec(4, 2, 64, 64)
    g = torch.Generator().manual_seed(0)
    w = qmoe.ExpertWeights.from_float(torch.randn(4, 128, 64, generator=g), torch.randn(4, 64, 64, generator=g),
                                      "mxfp4").to(DEVICE)
    b = get_backend("triton")
    prepared = b.prepare(spec, w)
    # one bucket rule: every M runs the nearest measured bucket, here the only one
    assert all(b.config_for(prepared, m) == winner for m in (1, 2, 3, 100, 4096))
