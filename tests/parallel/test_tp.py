"""Tensor parallelism on 2 and 4 gloo processes, and the batched format on a TP plan (cases and
what "equal" means: parallel_harness.py)."""

import pytest
from test_ep import check


@pytest.mark.parametrize("case", ["tp", "tp_exact", "tp_bias_once", "batched", "tp_triton"])
def test_tp_two_ranks(case):
    check(2, case)


@pytest.mark.parametrize("case", ["tp", "tp_exact"])
def test_tp_four_ranks(case):
    check(4, case)
