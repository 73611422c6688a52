#!/usr/bin/env python3
"""GPU probe of the triton backend's launch configurations, for the decode and batch-invariance
work (issue 12): which configurations give bitwise the same row for a token whatever the batch,
and what grouping inside the GEMMs (direct) and programmatic dependent launch (pdl) buy at decode.

    PYTHONPATH=src python3 scripts/device/probe.py [--presets gpt-oss-120b,kimi-k2.5,qwen3-30b-a3b]

Per preset (in its own format; qwen3 in nvfp4):
  invariance: every configuration runs the same 256 tokens, then prefixes of 1, 3 and 16 of them;
    rows are compared bitwise with the same configuration's full batch (is one configuration
    batch-invariant?) and with the reference configuration's (do configurations agree?);
  timing: qmoe.timing.measure (CUDA-graph replays, L2 flushed) of the experts at M = 1, 4, 16, 64
    for the decode variants.
Prints a short table last and writes probe.json to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

import qmoe  # noqa: E402
from qmoe.backends import get_backend  # noqa: E402
from qmoe.kernels.moe import KernelConfig as C  # noqa: E402
from qmoe.spec import PRESET_FORMATS  # noqa: E402
from qmoe.timing import measure  # noqa: E402

FORMATS = {"qwen3-30b-a3b": "nvfp4"}
BASE = C(16, 64, 64, False, 4, 3, 4)
INVARIANCE = {
    "mma16 nw4": BASE,
    "mma32 nw4": C(32, 64, 64, False, 4, 3, 2),
    "bm64 nw4": C(64, 64, 64, False, 4, 3, 2),
    "bm128 nw8": C(128, 128, 128, False, 8, 3, 2),
    "bm16 n32 split2": C(16, 32, 32, False, 4, 3, 4, split_k=2),
    "bm16 direct": replace(BASE, direct=True),
    "bm16 pdl": replace(BASE, pdl=True),
}
SWAPS = {"swap bm16": C(16, 64, 64, True, 4, 3, 4), "swap bm32": C(32, 64, 64, True, 4, 3, 2),
         "swap bm64": C(64, 64, 64, True, 4, 3, 2), "swap bm128": C(128, 64, 64, True, 4, 3, 2),
         "swap bm128 nw8": C(128, 128, 128, True, 8, 3, 2),
         "swap bm16 n32": C(16, 32, 32, True, 4, 3, 4), "swap bm16 n128": C(16, 64, 128, True, 4, 3, 4),
         "swap bm16 dir+pdl": C(16, 64, 64, True, 4, 3, 4, direct=True, pdl=True),
         "swap bm64 s4": C(64, 64, 64, True, 4, 4, 2), "swap bm128 t32": C(128, 64, 64, True, 4, 3, 2, tail_m=32),
         "swap bm128 nw8 t64": C(128, 128, 128, True, 8, 3, 2, tail_m=64)}
"""The weight first (every format since session 9): is it a batch-invariant family of its own?"""
DECODE = {
    "bm16 n32": C(16, 32, 32, False, 4, 3, 4),
    "bm16 n64": BASE,
    "bm16 n64 direct": replace(BASE, direct=True),
    "bm16 n64 pdl": replace(BASE, pdl=True),
    "bm16 n64 direct+pdl": replace(BASE, direct=True, pdl=True),
    "bm16 n32 direct+pdl": C(16, 32, 32, False, 4, 3, 4, direct=True, pdl=True),
    "bm16 n128 u2 direct+pdl": C(16, 128, 128, False, 8, 3, 2, direct=True, pdl=True),
    "bm16 n64 st4 direct+pdl": C(16, 64, 64, False, 4, 4, 4, direct=True, pdl=True),
    "bm64 n64 u2": C(64, 64, 64, False, 4, 3, 2),
    "bm64 n64 u2 direct+pdl": C(64, 64, 64, False, 4, 3, 2, direct=True, pdl=True),
}


def rows_differing(a, b):
    return int((a.view(torch.int16) != b.view(torch.int16)).any(dim=1).sum())


DEVICE = "cuda"


def probe(name, reps, smoke=False, timing=True):
    spec = qmoe.presets[name]
    if smoke:  # a CPU run of this script itself (interpreter, tiny shapes): catches its own bugs
        from qmoe.cli.check.cases import quick_spec

        spec = quick_spec(spec)
    fmt = FORMATS.get(name, PRESET_FORMATS[name])
    t0 = time.time()
    weights = qmoe.random_weights(spec, fmt, DEVICE)
    b = get_backend("triton")
    prep = b.prepare(spec, weights)
    res = {"preset": name, "format": fmt, "prepare_s": time.time() - t0, "invariance": {}, "timing": {}}
    g = torch.Generator(device=DEVICE).manual_seed(1)
    n = 32 if smoke else 256
    x = torch.randn(n, spec.hidden_size, device=DEVICE, generator=g).to(torch.bfloat16)
    ids, w = qmoe.route(spec, torch.randn(n, spec.num_experts, device=DEVICE, generator=g))
    ref = ref_swap = None
    configs = dict(INVARIANCE, **SWAPS)
    decode = DECODE
    if smoke:
        configs = dict(list(configs.items())[:2] + list(configs.items())[-2:])
        decode = dict(list(DECODE.items())[:2] + list(DECODE.items())[-1:])
    for label, cfg in configs.items():
        try:
            full = b.forward(prep, x, ids, w, torch.empty_like(x), config=cfg)
            ref = full if ref is None else ref
            if cfg.swap and ref_swap is None:
                ref_swap = full
            prefix = {m: rows_differing(b.forward(prep, x[:m].contiguous(), ids[:m].contiguous(),
                                                  w[:m].contiguous(), torch.empty_like(x[:m]), config=cfg),
                                        full[:m]) for m in (1, 3, 16)}
            res["invariance"][label] = {"config": asdict(cfg), "rows_vs_own_full_batch": prefix,
                                        "rows_vs_mma16": rows_differing(full, ref), "finite": bool(torch.isfinite(full).all()),
                                        "rows_vs_swap16": rows_differing(full, ref_swap) if cfg.swap else None}
        except Exception as e:  # a configuration that does not compile or launch: recorded
            res["invariance"][label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    for m in ((1, 4) if smoke else (1, 4, 16, 64)) if timing else ():
        xm, im, wm = x[:m].contiguous(), ids[:m].contiguous(), w[:m].contiguous()
        want = b.forward(prep, xm, im, wm, torch.empty_like(xm), config=BASE)
        row = {}
        for label, cfg in decode.items():
            try:
                out = torch.empty_like(xm)
                b.forward(prep, xm, im, wm, out, config=cfg)
                same = rows_differing(out, want)
                t = measure(lambda: b.forward(prep, xm, im, wm, out, config=cfg), device=DEVICE, reps=reps)
                row[label] = {"us": t["median_us"], "method": t["method"], "rows_differing": same,
                              "note": t["note"]}
            except Exception as e:
                row[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["timing"][m] = row
    del prep, weights
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="gpt-oss-120b,kimi-k2.5,qwen3-30b-a3b")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--no-timing", action="store_true", help="only the invariance part")
    args = ap.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    out = []
    for name in args.presets.split(","):
        t0 = time.time()
        out.append(probe(name, args.reps, args.smoke, not args.no_timing))
        print(f"{name}: probed in {time.time() - t0:.0f} s", flush=True)
        path = os.path.join(os.environ.get("OUT", "."), "probe.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    for r in out:
        print(f"\n{r['preset']} {r['format']}: rows differing (prefix 1/3/16 vs own batch of 256; full vs mma16, "
              f"and the weight-first ones vs swap bm16)")
        for label, v in r["invariance"].items():
            if "error" in v:
                print(f"  {label:20s} ERROR {v['error'][:120]}")
            else:
                p = v["rows_vs_own_full_batch"]
                swap = "" if v.get("rows_vs_swap16") is None else f"   vs swap bm16: {v['rows_vs_swap16']}"
                print(f"  {label:20s} {p[1]}/{p[3]}/{p[16]}   vs mma16: {v['rows_vs_mma16']}{swap}")
        if not r["timing"]:
            continue
        labels = list(next(iter(r["timing"].values())))
        print("  M    " + " ".join(f"{lab[:18]:>18}" for lab in labels))
        for m, row in r["timing"].items():
            cells = [f"{row[lab]['us']:18.1f}" if "us" in row[lab] else f"{'err':>18}" for lab in labels]
            print(f"  {m:<4} " + " ".join(cells))


if __name__ == "__main__":
    main()
