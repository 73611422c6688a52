"""qmoe.tuning.buckets: the one M-bucket rule every table is read with."""

import pytest

from qmoe.tuning.buckets import BUCKETS, bucket_ranges, nearest_bucket


def test_nearest_on_a_log_scale_with_geometric_boundaries():
    got = {m: nearest_bucket(m, BUCKETS) for m in (0, 1, 2, 3, 8, 9, 15, 32, 33, 63, 128, 129, 512, 513, 5792, 5793,
                                                    10 ** 6)}
    assert got == {0: 1, 1: 1, 2: 1, 3: 4, 8: 4, 9: 16, 15: 16, 32: 16, 33: 64, 63: 64, 128: 64, 129: 256, 512: 256,
                   513: 1024, 5792: 4096, 5793: 8192, 10 ** 6: 8192}


def test_a_sparse_or_odd_table_is_used_in_full():
    """Every measured bucket is reachable, whatever buckets the table holds (issue: the triton
    backend looked up the largest of 14 fixed buckets <= M, so 6 of 8 measured ones were dead)."""
    for buckets in ((2, 8, 32), (3,), (1, 1024), (5, 6, 7)):
        reached = {nearest_bucket(m, buckets) for m in range(0, 5000)}
        assert reached == set(buckets)
    assert bucket_ranges([1024, 1]) == [(0, 1), (33, 1024)]
    with pytest.raises(ValueError, match="at least one bucket"):
        nearest_bucket(4, [])
