"""Kernel-config tuning of the triton backend, run through `qmoe tune --kernels` (interpreter on
a CPU): the winners land in the user's table, and prepare() then launches with them."""

import argparse
import json

import torch

import qmoe
from qmoe import tune
from qmoe.backends import get_backend
from qmoe.backends.triton import TritonBackend, default_config
from qmoe.kernels.moe import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_tune_kernels_writes_the_table_and_prepare_uses_it(tmp_path, monkeypatch):
    table = tmp_path / "triton_configs.json"
    monkeypatch.setenv("QMOE_TRITON_CONFIGS", str(table))
    only = KernelConfig(16, 32, 32, False, 2, 2, 1)
    monkeypatch.setattr(TritonBackend, "candidates", lambda self, m, k, e, fmt="mxfp4": [default_config(m, k, e, fmt), only])
    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    args = parser.parse_args(["--experts", "4", "--hidden", "64", "--intermediate", "64", "--top-k", "2",
                              "--format", "mxfp4", "--backend", "triton", "--kernels", "--tokens", "3",
                              "--reps", "2", "--warmup", "0", "--allow-cpu", "--device", DEVICE,
                              "--tuning-file", str(tmp_path / "tuning.json")])
    assert tune.run(args) == 0
    saved = json.loads(table.read_text())
    (gpu, shapes), = saved.items()
    (key, buckets), = shapes.items()
    assert key == "mxfp4:E4:H64:I64:k2" and set(buckets) == {"2"}  # M=3 falls in bucket 2
    winner = KernelConfig(**buckets["2"])
    assert winner in (default_config(3, 2, 4), only)

    spec = qmoe.MoESpec(4, 2, 64, 64)
    g = torch.Generator().manual_seed(0)
    w = qmoe.ExpertWeights.from_float(torch.randn(4, 128, 64, generator=g), torch.randn(4, 64, 64, generator=g),
                                      "mxfp4").to(DEVICE)
    b = get_backend("triton")
    assert b.config_for(b.prepare(spec, w), 3) == winner
