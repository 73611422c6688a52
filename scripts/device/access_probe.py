#!/usr/bin/env python3
"""Does the weights' byte order cost the decode GEMMs memory bandwidth? A GEMM without the decode
(the packed bytes bitcast to bf16 and fed to the MMA, the weight first, 8 token rows), over the
active experts' weight bytes in the two orders a kernel could read them:

- rows:   the canonical layout, [E, N, K/2] bytes: a program's loop iteration reads PB bytes of
          each of its BN rows, KB bytes apart (what moe_gemm1/2_kernel read today);
- panels: [E, K/(2 PB), N, PB]: the same PB-byte pieces, each iteration's BN x PB bytes contiguous.

Same programs, same bytes, same pipelining (cp.async, `num_stages`); timed against each other
(qmoe.timing.measure_many: CUDA-graph replays interleaved, L2 flushed), beside read_sum (the
contiguous streaming kernel of the bench's floor) over the same number of bytes.

    PYTHONPATH=src python3 scripts/device/access_probe.py [--stages 3] [--pb 128]

Prints a table last and writes access_probe.json to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from qmoe.kernels.bandwidth import read_sum  # noqa: E402
from qmoe.kernels.layout import PAD, round_up  # noqa: E402
from qmoe.spec import preset  # noqa: E402
from qmoe.timing import measure_many  # noqa: E402


@triton.jit
def _stream_kernel(w_ptr, x_ptr, out_ptr, KB, ROWS, n_tiles, n_iter,
                   PANEL: tl.constexpr, BN: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr):
    """Program p: expert p // n_tiles, rows (p % n_tiles) * BN + [0, BN); n_iter iterations of PB
    bytes per row; acc [BN, BM] += bytes (as bf16) @ x^T; the sums stored (so nothing is dead)."""
    pid = tl.program_id(0)
    e = (pid // n_tiles).to(tl.int64)
    rn = (pid % n_tiles) * BN + tl.arange(0, BN)
    cols = tl.arange(0, PB // 2)
    ebase = w_ptr + e * ROWS * KB
    a = tl.load(x_ptr + tl.arange(0, BM)[:, None] * (PB // 2) + cols[None, :])
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for i in range(n_iter):
        if PANEL:
            p = ebase + i * ROWS * PB + rn[:, None] * PB
        else:
            p = ebase + rn[:, None] * KB + i * PB
        w = tl.load(p.to(tl.pointer_type(tl.int16)) + cols[None, :])
        acc = tl.dot(w.to(tl.bfloat16, bitcast=True), tl.trans(a), acc)
    tl.store(out_ptr + pid * BN * BM + tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :], acc)


def cases():
    """(name, active experts, rows per expert, bytes per row, BN) for the presets' GEMMs."""
    out = []
    for name, experts in (("gpt-oss-120b", (4, 107)), ("kimi-k2.5", (8, 32, 283)), ("qwen3-30b-a3b", (8, 100))):
        s = preset(name)
        Hp, Ip = round_up(s.hidden_size, PAD), round_up(s.intermediate_size, PAD)
        for ea in experts:
            out.append((f"{name} GEMM1 E{ea}", ea, 2 * Ip, Hp // 2, 128))
            out.append((f"{name} GEMM2 E{ea}", ea, Hp, Ip // 2, 128 if name == "kimi-k2.5" else 64))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--pb", type=int, default=128, help="bytes per row per iteration (a power of 2)")
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args()
    dev = torch.device("cuda")
    BM, PB = 8, args.pb
    x = torch.randn(BM, PB // 2, device=dev).to(torch.bfloat16)
    rows_out = []
    for name, ea, rows, kb, bn in cases():
        n_iter = kb // PB
        nbytes = ea * rows * kb
        w = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
        n_tiles = rows // bn
        grid = (ea * n_tiles,)
        out = torch.empty(grid[0] * bn * BM, dtype=torch.float32, device=dev)
        flat = w.view(torch.float32)
        fns = {}
        for label, panel in (("rows", False), ("panels", True)):
            def run(panel=panel):
                _stream_kernel[grid](w, x, out, kb, rows, n_tiles, n_iter, PANEL=panel, BN=bn, PB=PB, BM=BM,
                                     num_warps=args.warps, num_stages=args.stages)
            fns[label] = run
        fns["read_sum"] = lambda: read_sum(flat, 4 * 132)
        res = measure_many(fns, device=dev, reps=60)
        row = {"case": name, "experts": ea, "rows": rows, "row_bytes": kb, "block_n": bn, "programs": grid[0],
               "bytes": nbytes, "stages": args.stages, "pb": PB}
        for k, r in res.items():
            row[k] = r.get("median_us")
            if "error" in r:
                row[k + "_error"] = r["error"]
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        del w, out, flat
        torch.cuda.empty_cache()
    print(f"\ncase (stages {args.stages}, {PB} B/row/iteration) | programs | rows us | panels us | read_sum us | "
          "rows GB/s | panels GB/s | panels/rows")
    for r in rows_out:
        if r.get("rows") and r.get("panels"):
            gb = r["bytes"] / 1e3
            print(f"{r['case']} | {r['programs']} | {r['rows']:.1f} | {r['panels']:.1f} | {r['read_sum']:.1f} | "
                  f"{gb / r['rows']:.0f} | {gb / r['panels']:.0f} | {r['panels'] / r['rows']:.3f}")
        else:
            print(r)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, f"access_probe_st{args.stages}_pb{PB}.json"), "w") as f:
        json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
