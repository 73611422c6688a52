#!/usr/bin/env python3
"""The triton backend's table configuration per M against variants of it: each variant changes a
few KernelConfig fields of the table's entry; all are timed against each other
(qmoe.timing.measure_many: CUDA-graph replays interleaved, L2 flushed) and their outputs compared
with the table's, bitwise (a variant that only changes how the loads are scheduled must give the
same bits; one that changes the K reduction, such as split-K, may not: then the relative
difference to the table's output says whether it is rounding or a wrong answer).

    PYTHONPATH=src python3 scripts/device/config_ab.py [--presets ...] [--tokens 1,16,64] \
        [--variants "num_stages=4;block_n1=128,block_n2=128;scale_words=flip"]

With --row-order, one more variant per M: the table's configuration on the same weights stored in
row order (the kernel layout's [E, N, K/(2P), P] view made contiguous: kernels/layout.py), against
the panel order they are prepared in.

A variant is a comma-separated list of field=value (value an integer, true/false, or `flip` for a
flag); variants are separated by `;`. A variant the configuration checks refuse (KernelConfig's,
and problem_with's for the weights' format and padded shape) is reported as refused with the
reason. Prints a short table last and writes config_ab.json to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields, replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

import qmoe  # noqa: E402
from qmoe.backends import get_backend  # noqa: E402
from qmoe.kernels.moe import KernelConfig  # noqa: E402
from qmoe.spec import PRESET_FORMATS  # noqa: E402
from qmoe.timing import measure_many  # noqa: E402
from qmoe.weights import random_weights  # noqa: E402

FORMATS = {"qwen3-30b-a3b": "nvfp4"}
FLAGS = {f.name for f in fields(KernelConfig) if f.type in (bool, "bool")}
NAMES = {f.name for f in fields(KernelConfig)}


def parse_variants(text: str) -> list[dict]:
    """'a=1,b=flip;c=true' -> [{'a': 1, 'b': 'flip'}, {'c': True}] (unknown fields: ValueError)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        change = {}
        for item in part.split(","):
            k, _, v = item.partition("=")
            k, v = k.strip(), v.strip().lower()
            if k not in NAMES:
                raise ValueError(f"variant {part!r}: {k!r} is not a KernelConfig field ({sorted(NAMES)})")
            if k in FLAGS:
                if v not in ("true", "false", "flip"):
                    raise ValueError(f"variant {part!r}: {k} takes true, false or flip, got {v!r}")
                change[k] = v if v == "flip" else v == "true"
            else:
                change[k] = int(v)
        out.append(change)
    return out


def apply(cfg: KernelConfig, change: dict) -> KernelConfig:
    return replace(cfg, **{k: (not getattr(cfg, k)) if v == "flip" else v for k, v in change.items()})


def label(change: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in change.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt-oss-120b,qwen3-30b-a3b,kimi-k2.5")
    ap.add_argument("--tokens", default="1024,4096,8192")
    ap.add_argument("--variants", default="scale_words=flip")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--row-order", action="store_true", help="also time the table's config on row-ordered weights")
    args = ap.parse_args()
    changes = parse_variants(args.variants)
    b = get_backend("triton")
    rows = []
    for name in args.presets.split(","):
        spec = qmoe.presets[name]
        fmt = FORMATS.get(name, PRESET_FORMATS[name])
        prep = b.prepare(spec, random_weights(spec, fmt, "cuda", seed=0))
        preps = {}
        if args.row_order:
            kw0 = prep.meta["kernel_weights"]
            kw_rows = replace(kw0, w13=kw0.w13.contiguous(), w2=kw0.w2.contiguous(), counters=[])
            preps["row order"] = replace(prep, meta={**prep.meta, "kernel_weights": kw_rows})
        for m in (int(t) for t in args.tokens.split(",")):
            table = b.config_for(prep, m)
            g = torch.Generator(device="cuda").manual_seed(m)
            x = torch.randn(m, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            ids, w = qmoe.route(spec, torch.randn(m, spec.num_experts, device="cuda", generator=g))
            kw = prep.meta["kernel_weights"]
            configs, refused = {"table": table, **{n: table for n in preps}}, {}
            for ch in changes:
                try:
                    c = apply(table, ch)
                except ValueError as e:
                    refused[label(ch)] = str(e)
                    continue
                why = c.problem_with(fmt, kw.Hp, kw.Ip)
                if why is None:
                    configs[label(ch)] = c
                else:
                    refused[label(ch)] = why
            outs = {n: torch.full((m, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
                    for n in configs}
            fns = {n: (lambda n=n, c=c, p=preps.get(n, prep): b.forward(p, x, ids, w, outs[n], config=c))
                   for n, c in configs.items()}
            res = measure_many(fns, device="cuda", warmup=3, reps=args.reps)
            base = res["table"].get("median_us")
            for n, c in configs.items():
                r = res[n]
                ran = "median_us" in r and "median_us" in res["table"]
                row = {"preset": name, "M": m, "variant": n, "config": asdict(c), "us": r.get("median_us"),
                       "error": r.get("error"), "same_bits": bool(torch.equal(outs["table"], outs[n])) if ran else None}
                if row["us"] and base:
                    row["ratio"] = row["us"] / base
                if ran and not row["same_bits"]:   # how far: rounding (~1e-3) or a wrong answer (~1)
                    d = (outs[n].double() - outs["table"].double()).norm() / outs["table"].double().norm()
                    row["rel_diff"] = float(d)
                rows.append(row)
                print(json.dumps(row), flush=True)
            for n, why in refused.items():
                rows.append({"preset": name, "M": m, "variant": n, "refused": why})
        del prep, preps
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "config_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'preset':14} {'M':>5} {'variant':40} {'us':>8} {'ratio':>6} bits")
    for r in rows:
        if "refused" in r:
            print(f"{r['preset']:14} {r['M']:5} {r['variant']:40} refused: {r['refused'][:60]}")
        elif r["us"] is None:
            print(f"{r['preset']:14} {r['M']:5} {r['variant']:40} error: {str(r['error'])[:60]}")
        else:
            print(f"{r['preset']:14} {r['M']:5} {r['variant']:40} {r['us']:8.1f} {r.get('ratio', 0):6.3f} "
                  f"{'same' if r['same_bits'] else 'differ by %.1e' % r['rel_diff']}")


if __name__ == "__main__":
    main()
