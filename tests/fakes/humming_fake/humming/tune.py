"""Interval tables over valid_shape_m = M * top_k, as get_heuristics_config returns them:
[[lo, hi, kernel config], ...] with lo < valid_shape_m <= hi, the last hi = 1 << 30.

The fake's block_m rule follows humming's MoE rule (the first of 8, 16, 32, 48, 64 with
shape_m / E / block_m below a threshold), with a threshold that grows with N / K so that the
two matrices of one layer can pick different block sizes at the same M, as the real tables do.
"""

from __future__ import annotations

from ._fake import STATE


class _Heuristics:
    @classmethod
    def should_use_pdl_for_input(cls, layer_config, shape_m: int) -> bool:
        return shape_m <= STATE.pdl_rows


heuristics_map = {sm: _Heuristics for sm in (75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)}


def get_heuristics_class(device=None):
    return _Heuristics


def _block_m(config, shape_m: int) -> int:
    n, k = config.shape_n - config.pad_shape_n, config.shape_k - config.pad_shape_k
    limit = 0.9 * max(1.0, n / k)
    for bm in (8, 16, 32, 48, 64):
        if shape_m / config.num_experts / bm < limit:
            return bm
    return 64


def get_heuristics_config(layer_config, shape_m=None, use_f16_accum=False, use_batch_invariant=False,
                          use_m_major_input_scale=False, gemm_type="dense", device=None):
    gemm_type = getattr(gemm_type, "value", gemm_type)
    assert shape_m is None, "fake humming: only whole tables are emulated"
    STATE.calls.append(("get_heuristics_config", {"gemm_type": gemm_type, "use_f16_accum": use_f16_accum,
                                                  "use_batch_invariant": use_batch_invariant}))
    table, last = [], None
    for m in [1, 2, 4] + list(range(8, 65536, 8)):
        bm = _block_m(layer_config, m)
        if table and bm == last:
            table[-1][1] = m
        else:
            lo = table[-1][1] if table else 0
            table.append([lo, m, {"block_shape": (bm, 128, 64), "warp_shape": (bm, 32, 64), "num_stages": 4}])
        last = bm
    table[-1][1] = 1 << 30
    return table
