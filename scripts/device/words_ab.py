#!/usr/bin/env python3
"""scale_words at prefill: the triton backend's shipped configuration per M against the same
configuration with KernelConfig.scale_words, timed against each other (qmoe.timing.measure_many:
CUDA-graph replays interleaved, L2 flushed), outputs compared bitwise.

    PYTHONPATH=src python3 scripts/device/words_ab.py [--presets ...] [--tokens 1024,4096,8192]

Session 5 measured scale_words at decode only (M <= 64); this says whether the prefill entries of
the launch table should use it too. Prints a short table last and writes words_ab.json to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

import qmoe  # noqa: E402
from qmoe.backends import get_backend  # noqa: E402
from qmoe.spec import PRESET_FORMATS  # noqa: E402
from qmoe.timing import measure_many  # noqa: E402
from qmoe.weights import random_weights  # noqa: E402

FORMATS = {"qwen3-30b-a3b": "nvfp4"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt-oss-120b,qwen3-30b-a3b,kimi-k2.5")
    ap.add_argument("--tokens", default="1024,4096,8192")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    b = get_backend("triton")
    rows = []
    for name in args.presets.split(","):
        spec = qmoe.presets[name]
        fmt = FORMATS.get(name, PRESET_FORMATS[name])
        prep = b.prepare(spec, random_weights(spec, fmt, "cuda", seed=0))
        for m in (int(t) for t in args.tokens.split(",")):
            cfg = b.config_for(prep, m)
            if cfg.k_unroll % 2:
                rows.append({"preset": name, "M": m, "config": asdict(cfg), "skipped": "odd k_unroll"})
                continue
            words = replace(cfg, scale_words=not cfg.scale_words)
            g = torch.Generator(device="cuda").manual_seed(m)
            x = torch.randn(m, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            ids, w = qmoe.route(spec, torch.randn(m, spec.num_experts, device="cuda", generator=g))
            outs = {n: torch.full((m, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")
                    for n in ("table", "flipped")}
            fns = {"table": lambda c=cfg: b.forward(prep, x, ids, w, outs["table"], config=c),
                   "flipped": lambda c=words: b.forward(prep, x, ids, w, outs["flipped"], config=c)}
            res = measure_many(fns, device="cuda", warmup=3, reps=args.reps)
            same = bool(torch.equal(outs["table"], outs["flipped"]))
            row = {"preset": name, "M": m, "config": asdict(cfg), "same_bits": same,
                   **{n: r.get("median_us", r.get("error")) for n, r in res.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del prep
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "words_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'preset':16} {'M':>5} {'table words':>11} {'table us':>9} {'flipped us':>10} {'ratio':>6} bits")
    for r in rows:
        if "skipped" in r:
            print(f"{r['preset']:16} {r['M']:5} skipped: {r['skipped']}")
        elif isinstance(r["table"], float) and isinstance(r["flipped"], float):
            print(f"{r['preset']:16} {r['M']:5} {str(r['config']['scale_words']):>11} {r['table']:9.1f} "
                  f"{r['flipped']:10.1f} {r['flipped'] / r['table']:6.3f} {'same' if r['same_bits'] else 'DIFFER'}")
        else:
            print(f"{r['preset']:16} {r['M']:5} error: {r['table']} / {r['flipped']}")


if __name__ == "__main__":
    main()
