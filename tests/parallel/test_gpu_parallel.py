"""On a GPU: EP (fixed buffers) and TP captured in CUDA graphs over an NCCL group of one, with the
triton backend (cases: parallel_harness.py). The multi-GPU runs are scripts/device/parallel_check.py
under torchrun."""

import pytest
import torch
from parallel_harness import results

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_capture_one_gpu():
    r = results(1, "nccl")["capture"]
    if not r["ok"]:
        pytest.fail(r["error"], pytrace=False)
