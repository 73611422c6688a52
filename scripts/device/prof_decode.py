"""Hardware counters of the decode gap (issue 12): one experts forward per backend and M, for ncu.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 scripts/device/prof_decode.py --presets gpt-oss-120b,kimi-k2.5 --backends triton,humming,marlin

Each (preset, backend, M) is warmed up (JIT, tables) outside the profiled range, then exactly one
forward runs between cudaProfilerStart and cudaProfilerStop, after a line "=== <preset> <backend>
M=<M>" on stdout, so ncu's report of the kernels that follow belongs to that call. Weights come
from qmoe.weights.random_weights (the speed of a kernel does not depend on the values), the
triton backend runs its shipped launch table. Without ncu it just runs (a smoke test).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import qmoe  # noqa: E402
from qmoe.backends import get_backend  # noqa: E402
from qmoe.spec import PRESET_FORMATS  # noqa: E402
from qmoe.weights import random_weights  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt-oss-120b")
    ap.add_argument("--backends", default="triton,humming")
    ap.add_argument("--tokens", default="16,64")
    args = ap.parse_args()
    cudart = torch.cuda.cudart()
    for name in args.presets.split(","):
        spec, fmt = qmoe.presets[name], PRESET_FORMATS[name]
        weights = random_weights(spec, fmt, "cuda", seed=0)
        for bname in args.backends.split(","):
            b = get_backend(bname)
            ok = b.supports(spec, fmt, torch.device("cuda"))
            if not ok:
                print(f"=== {name} {bname}: skipped: {ok.reason}", flush=True)
                continue
            prepared = b.prepare(spec, weights)
            for M in (int(m) for m in args.tokens.split(",")):
                g = torch.Generator(device="cuda").manual_seed(M)
                x = torch.randn(M, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
                ids, w = qmoe.route(spec, torch.randn(M, spec.num_experts, device="cuda", generator=g))
                out = torch.empty_like(x)
                run = b.runner(prepared, M)
                for _ in range(3):
                    run(x, ids, w, out)
                torch.cuda.synchronize()
                active = int(torch.unique(ids).numel())
                print(f"=== {name} {bname} M={M} ({active} active experts)", flush=True)
                cudart.cudaProfilerStart()
                torch.cuda.nvtx.range_push(f"{name} {bname} M={M}")   # ncu --nvtx names the call per kernel
                run(x, ids, w, out)
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
                cudart.cudaProfilerStop()
            del prepared
            torch.cuda.empty_cache()
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
