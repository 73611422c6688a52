#!/usr/bin/env python3
"""Where a decode call's time goes: the triton backend's table configuration per preset and M,
called eagerly with the L2 flushed before each call (as qmoe bench does), its kernels timed by
the torch profiler (mean us per call, by kernel name). Prints a table; writes
$OUT/kernel_split.json (kernel_split_nopdl.json with --no-pdl; the --flush kind as a suffix unless zero).

    PYTHONPATH=src python3 scripts/device/kernel_split.py [--presets ...] [--tokens 1,4,16] [--no-pdl]
        [--flush zero|read|none|w13|w2|both] [--variants "split_k=2;block_m=8,swap=true"]

--flush picks the flush (flush_probe.py's kinds; w13 / w2 / both zero the buffer, then read those of
the active experts' bytes into the L2, to see what a kernel gains from finding its weights there);
--variants times changes of the table's entry too, in config_ab.py's syntax.

With programmatic dependent launch (the table's decode entries) a kernel starts while the one
before it runs and waits on the device, so its profiled time includes that wait: the parts then
overlap and do not add up to the call. --no-pdl runs the same configurations without it, so each
kernel's time is its own (the call is then slower by the launch gaps PDL hides).
"""

import argparse
import collections
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

import qmoe  # noqa: E402
from qmoe.backends import get_backend  # noqa: E402
from qmoe.kernels.bandwidth import read_sum  # noqa: E402
from qmoe.spec import PRESET_FORMATS  # noqa: E402
from qmoe.timing import L2_FLUSH_BYTES  # noqa: E402
from config_ab import apply, label, parse_variants  # noqa: E402  (scripts/device)
from flush_probe import flush_kinds  # noqa: E402  (scripts/device)
from qmoe.weights import random_weights  # noqa: E402


def _expert_bytes(kw, ids, which: str) -> list:
    """Flat fp32 views of the active experts' bytes of w13 and s13 (which = "w13"), w2 and s2
    ("w2") or all four ("both"); [] for the other flush kinds."""
    names = {"w13": ("w13", "s13"), "w2": ("w2", "s2"), "both": ("w13", "s13", "w2", "s2")}.get(which, ())
    out = []
    for e in torch.unique(ids[(ids >= 0) & (ids < kw.E)]).tolist():
        for n in names:
            t = getattr(kw, n)
            per = t.untyped_storage().nbytes() // kw.E // 4 * 4   # an expert's bytes (E outermost in storage)
            flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage(), e * per, (per,))
            out.append(flat.view(torch.float32))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt-oss-120b,kimi-k2.5,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--no-pdl", action="store_true", help="the table's configurations without PDL")
    ap.add_argument("--flush", choices=("zero", "read", "none", "w13", "w2", "both"), default="zero",
                    help="before each call: zero a 256 MB buffer (qmoe.timing's flush), read it, or nothing; "
                         "w13 / w2 / both: zero it, then read the active experts' w13 / w2 / both (weights and "
                         "scales) into the L2")
    ap.add_argument("--variants", default="",
                    help="also each of these changes of the table's configuration (config_ab.py's syntax)")
    args = ap.parse_args()
    changes = [{}] + parse_variants(args.variants)
    b = get_backend("triton")
    big = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")  # what qmoe.timing zeroes
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    flush = flush_kinds(big).get(args.flush, big.zero_)
    rows = []
    for name in args.presets.split(","):
        spec = qmoe.presets[name]
        prep = b.prepare(spec, random_weights(spec, PRESET_FORMATS[name], "cuda", seed=0))
        for m in (int(t) for t in args.tokens.split(",")):
            table = b.config_for(prep, m)
            g = torch.Generator(device="cuda").manual_seed(m)
            x = torch.randn(m, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            ids, w = qmoe.route(spec, torch.randn(m, spec.num_experts, device="cuda", generator=g))
            out = torch.empty(m, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
            warm = _expert_bytes(prep.meta["kernel_weights"], ids, args.flush)
            for change in changes:
                cfg = apply(table, change)
                if args.no_pdl:
                    cfg = replace(cfg, pdl=False)
                for _ in range(3):
                    b.forward(prep, x, ids, w, out, config=cfg)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.calls):
                        flush()
                        for t in warm:
                            read_sum(t, 4 * sms)
                        b.forward(prep, x, ids, w, out, config=cfg)
                    torch.cuda.synchronize()
                per = collections.defaultdict(float)
                for ev in prof.events():
                    if ev.device_type == torch.autograd.DeviceType.CUDA and "elementwise" not in ev.name \
                            and "fill" not in ev.name.lower() and "read_sum" not in ev.name:
                        per[ev.name[:40]] += ev.time_range.elapsed_us() / args.calls
                row = {"preset": name, "M": m, "variant": label(change) or "table", "pdl": cfg.pdl,
                       "flush": args.flush, "config": str(cfg), "us": dict(per), "sum_us": sum(per.values())}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del prep
        torch.cuda.empty_cache()
    stem = "kernel_split" + ("_nopdl" if args.no_pdl else "") + ("" if args.flush == "zero" else f"_{args.flush}")
    path = os.path.join(os.environ.get("OUT", "."), stem + ".json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        parts = "  ".join(f"{k}={v:.1f}" for k, v in sorted(r["us"].items()))
        print(f"{r['preset']:14} {r['M']:4} {r['variant']:24} pdl={int(r['pdl'])} sum {r['sum_us']:7.1f}  {parts}")


if __name__ == "__main__":
    main()
