"""Expert parallelism on 2 and 4 gloo processes: the parallel output equals the single-process
one (cases and what "equal" means: parallel_harness.py)."""

import inspect

import pytest
from parallel_harness import results

import qmoe


def check(world, case):
    r = results(world)[case]
    if not r["ok"]:
        pytest.fail(f"{case} on {world} ranks:\n{r['error']}", pytrace=False)


@pytest.mark.parametrize("case", ["errors", "ep_e8", "ep_e16", "ep_fp32", "ep_e10_uneven", "ep_skewed", "ep_m0",
                                  "ep_ids", "ep_exact", "ep_repeat", "ep_alone", "ep_triton"])
def test_ep_two_ranks(case):
    check(2, case)


@pytest.mark.parametrize("case", ["ep_e8", "ep_e16", "ep_e10_uneven", "ep_skewed", "ep_m0", "ep_ids", "ep_exact"])
def test_ep_four_ranks(case):
    check(4, case)


@pytest.mark.parametrize("world", [2, 4])
def test_moe_facade(world):
    if "ep_group" not in inspect.signature(qmoe.MoE).parameters:
        pytest.skip("qmoe.MoE takes no ep_group yet (docs/parallel.md: the lines moe.py needs)")
    check(world, "moe_facade")
