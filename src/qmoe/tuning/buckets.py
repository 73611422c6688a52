"""The one M-bucket rule: which measured token count stands for a call with M tokens.

Every table keyed by token count (the tuning table behind backend="auto", the triton
backend's launch configs) is read through `nearest_bucket`: M runs the measured bucket
nearest to it on a log scale, the boundary between neighbours b[i] < b[i+1] lying at their
geometric mean (M <= isqrt(b[i] * b[i+1]) stays with b[i]). Below the first bucket, the
first; above the last, the last. A table measured at any set of buckets is used in full.
"""

from __future__ import annotations

import bisect
import math

BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
"""Token counts measured by default: decode (1..64) to prefill (1024..8192)."""


def bucket_ranges(buckets) -> list:
    """[(min_tokens, bucket)] for sorted distinct positive buckets: bucket b[i] runs M in
    [min_tokens_i, min_tokens_{i+1}); the first range starts at 0."""
    buckets = sorted(buckets)
    return [(0 if i == 0 else math.isqrt(buckets[i - 1] * b) + 1, b) for i, b in enumerate(buckets)]


def nearest_bucket(m: int, buckets) -> int:
    """The bucket that stands for m tokens (see the module doc). buckets: a non-empty
    collection of positive ints."""
    ranges = bucket_ranges(buckets)
    if not ranges:
        raise ValueError("buckets: expected at least one bucket, got none")
    i = bisect.bisect_right([lo for lo, _ in ranges], m) - 1
    return ranges[max(i, 0)][1]


__all__ = ["BUCKETS", "bucket_ranges", "nearest_bucket"]
