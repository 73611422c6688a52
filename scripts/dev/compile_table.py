#!/usr/bin/env python3
"""Compile every launch configuration of the shipped table for sm_90 with a given Triton, on a
machine without a GPU, and list per kernel its registers, local memory (spills), shared memory
and main-loop counts (scripts/dev/sass_loop.py's compile and loop finder), and what exposes it to
triton-lang/triton#9433 (wgmmas with a register operand, the most groups a wait leaves in flight:
kernels.register_wgmma_hazard). Run once per Triton,
each in its own process, to see what a Triton upgrade changes before a GPU measures it:

    python3 scripts/dev/compile_table.py --triton /tmp/t36 --json /tmp/t36.json
    python3 scripts/dev/compile_table.py --triton .venv/lib/python3.11/site-packages --json /tmp/t39.json
    python3 scripts/dev/compile_table.py --compare /tmp/t36.json /tmp/t39.json

A configuration that fails to compile is listed with the error (a Triton that cannot build it).
"""

import argparse
import json
import os
import re
import sys
from argparse import Namespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SHIPPED = os.path.join(HERE, "..", "..", "src", "qmoe", "backends", "triton", "configs.json")


def shapes():
    """[(fmt, kernel, KernelConfig fields that shape the compile)] of the shipped table, distinct."""
    table = json.load(open(SHIPPED))["entries"]
    out = []
    for key, entry in table.items():
        fmt = key.split("|")[1]
        for c in entry["buckets"].values():
            for kernel, bn in (("gemm1", c["block_n1"]), ("gemm2", c["block_n2"])):
                rows = [c["block_m"]] + ([c["tail_m"]] if c.get("tail_m") else [])
                for bm in rows:
                    item = (fmt, kernel, bm, bn, c["num_warps"], c["num_stages"], c["k_unroll"], int(c["swap"]),
                            int(kernel == "gemm1" and c.get("whole_k", False)),
                            c["split_k1"] if kernel == "gemm1" else c["split_k"],
                            int(kernel == "gemm1" and c.get("stream_k1", 0) > 0))
                    if item not in out:
                        out.append(item)
    return out


def compile_one(triton_dir, item):
    import sass_loop

    fmt, kernel, bm, bn, warps, stages, u, swap, whole, split, stream = item
    args = Namespace(triton=triton_dir, kernel=kernel, fmt=fmt, block_m=bm, block_n=bn, warps=warps, stages=stages,
                     k_unroll=u, swap=swap, whole=whole, split=split, stream=stream, words=2)
    ck = sass_loop.compile_kernel(args)
    sass, res = sass_loop.disassemble(ck, triton_dir)
    loop = sass_loop.main_loop(sass)
    grab = (lambda name: int(m.group(1)) if (m := re.search(name + r":(\d+)", res)) else None)
    ptx = ck.asm["ptx"]
    # exposure to triton-lang/triton#9433: wgmmas reading their first operand from registers, and
    # the most wgmma groups a wait leaves in flight (3.6: up to 3; the fix: copies and at most 1)
    reg_a = len(re.findall(r"wgmma\.mma_async\S* \{[^}]*\}, \{%r", ptx))
    waits = [int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)]
    return {"regs": grab("REG"), "local": grab("LOCAL"), "shared": ck.metadata.shared, "loop": len(loop),
            "mma": sum("MMA" in t for t in loop), "mma_kind": sorted({t.split()[0] for t in loop if "MMA" in t}),
            "reg_a_wgmma": reg_a, "max_wait": max(waits, default=0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", help="a folder holding the triton package to compile with")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two --json files: print them side by side")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.load(open(p)) for p in args.compare)
        print(f"{'config':58s} {a['triton']:>30s} | {b['triton']:>30s}   (aN: wgmmas with a register operand, wN: most "
              f"groups a wait leaves in flight)")
        for key in a["kernels"]:
            ra, rb = a["kernels"][key], b["kernels"].get(key, {"error": "absent"})
            cell = (lambda r: r["error"][:30] if "error" in r else
                    f"r{r['regs']} l{r['local']} loop {r['loop']} mma {r['mma']} a{r['reg_a_wgmma']}w{r['max_wait']}")
            print(f"{key:58s} {cell(ra):>30s} | {cell(rb):>30s}")
        return
    if not args.triton:
        ap.error("--triton or --compare")
    sys.path.insert(0, args.triton)
    import triton

    results = {}
    items = shapes()
    for i, item in enumerate(items):
        key = "{} {} {}x{} w{} s{} u{} swap{} whole{} split{} stream{}".format(*item)
        try:
            results[key] = compile_one(args.triton, item)
        except Exception as e:  # noqa: BLE001 - a Triton that cannot build it: say so, go on
            results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"[{i + 1}/{len(items)}] {key}: {results[key]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "kernels": results}, f, indent=1)


if __name__ == "__main__":
    main()
