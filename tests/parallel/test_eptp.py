"""EP x TP on 4 gloo processes (2 x 2): experts split over the EP pairs, the intermediate
dimension over the TP pairs (cases: parallel_harness.py)."""

from test_ep import check


def test_ep_x_tp_four_ranks():
    check(4, "eptp")
