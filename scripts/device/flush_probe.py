#!/usr/bin/env python3
"""What the L2 flush costs the call after it: decode calls and a plain read of the same bytes, in
CUDA-graph replays, after three kinds of flush.

    PYTHONPATH=src python3 scripts/device/flush_probe.py [--presets ...] [--tokens 1,4] [--reps 40]

- zero: qmoe.timing's flush, a 256 MB buffer zeroed. The L2 is left full of dirty lines, so the
  timed call's first ~60 MB of reads also write those lines back to DRAM.
- read: the same buffer read once (read_sum). The L2 is left full of clean lines: the timed
  call finds none of its bytes there, and evicting costs nothing.
- none: no flush; the call's own bytes from the previous replay may still be in the L2.

Timed after each kind: the triton backend's call with its table configuration, and beside it
`read_sum` over a buffer of the call's active weight bytes, in one launch and in two (GEMM1's and
GEMM2's shares). Prints a table; writes $OUT/flush_probe.json.
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

import qmoe  # noqa: E402
from qmoe.backends import get_backend  # noqa: E402
from qmoe.kernels.bandwidth import read_sum  # noqa: E402
from qmoe.spec import PRESET_FORMATS  # noqa: E402
from qmoe.timing import L2_FLUSH_BYTES, capture_graph  # noqa: E402
from qmoe.weights import random_weights  # noqa: E402


def flush_kinds(big: torch.Tensor) -> dict:
    """{kind: callable} for the three flushes above, over big (a float32 CUDA buffer of
    L2_FLUSH_BYTES, the size qmoe.timing zeroes)."""
    sms = torch.cuda.get_device_properties(big.device).multi_processor_count
    return {"zero": big.zero_, "read": lambda: read_sum(big, 4 * sms), "none": lambda: None}


def _times(runs: dict, flush, reps: int) -> dict:
    """{name: median us} of graph replays, each after flush(), the names interleaved."""
    out = {n: [] for n in runs}
    for _ in range(reps):
        for n, run in runs.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush()
            s.record()
            run()
            e.record()
            out[n].append((s, e))
    torch.cuda.synchronize()
    return {n: statistics.median(s.elapsed_time(e) * 1e3 for s, e in p) for n, p in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt-oss-120b,kimi-k2.5,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    big = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    flushes = flush_kinds(big)
    b = get_backend("triton")
    rows = []
    for name in args.presets.split(","):
        spec = qmoe.presets[name]
        weights = random_weights(spec, PRESET_FORMATS[name], "cuda", seed=0)
        prep = b.prepare(spec, weights)
        per_expert = weights.expert_nbytes()
        w13_share = weights.w13.nbytes / (weights.w13.nbytes + weights.w2.nbytes)
        for m in (int(t) for t in args.tokens.split(",")):
            g = torch.Generator(device="cuda").manual_seed(m)
            x = torch.randn(m, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            ids, w = qmoe.route(spec, torch.randn(m, spec.num_experts, device="cuda", generator=g))
            out = torch.empty(m, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
            active = int(torch.unique(ids).numel())
            nbytes = active * per_expert
            n1 = int(nbytes * w13_share) // 4
            buf = torch.rand(nbytes // 4, device="cuda")
            runs = {"triton": capture_graph(lambda: b.forward(prep, x, ids, w, out)).replay,
                    "read_sum": capture_graph(lambda: read_sum(buf, 4 * sms)).replay,
                    "read_sum x2": capture_graph(lambda: (read_sum(buf[:n1], 4 * sms),
                                                          read_sum(buf[n1:], 4 * sms))).replay}
            for _ in range(3):
                for run in runs.values():
                    run()
            for kind, flush in flushes.items():
                t = _times(runs, flush, args.reps)
                row = {"preset": name, "M": m, "flush": kind, "active": active, "MB": nbytes / 1e6,
                       "us": t, "read_sum_TBps": nbytes / t["read_sum"] / 1e6}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del buf
        del prep, weights
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "flush_probe.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'preset':14} {'M':>4} {'flush':5} {'MB':>6} {'triton':>8} {'read_sum':>9} {'x2':>7} {'TB/s':>5}")
    for r in rows:
        u = r["us"]
        print(f"{r['preset']:14} {r['M']:4} {r['flush']:5} {r['MB']:6.1f} {u['triton']:8.1f} {u['read_sum']:9.1f}"
              f" {u['read_sum x2']:7.1f} {r['read_sum_TBps']:5.2f}")


if __name__ == "__main__":
    main()
