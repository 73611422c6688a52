"""GPU diagnostics for the triton backend: per-kernel time (torch profiler), registers/spills,
and a few launch configurations, at gpt-oss-120b mxfp4. Writes $OUT/diag.json."""
import json, os, sys
import torch
sys.path.insert(0, "src")
import qmoe
from qmoe.backends import get_backend
from qmoe.weights import random_weights
from qmoe.kernels.moe import KernelConfig, fused_moe
from qmoe.timing import measure

OUT = os.environ.get("OUT", "out")
spec = qmoe.presets["gpt-oss-120b"]
w = random_weights(spec, "mxfp4", "cuda", bias_std=0.5)
b = get_backend("triton")
prep = b.prepare(spec, w)
kw, act = prep.meta["kernel_weights"], spec.activation
C = KernelConfig
CFGS = [C(16, 32, 64, False, 4, 3, 4), C(16, 64, 64, False, 4, 3, 4), C(16, 64, 64, False, 4, 3, 2),
        C(32, 64, 64, False, 4, 3, 4), C(128, 128, 64, False, 8, 3, 2)]
print("fold13/fold2:", kw.fold13, kw.fold2, "max scale bytes", int(kw.s13.max()), int(kw.s2.max()))
res = []
for M in [int(v) for v in os.environ.get('DIAG_MS', '1,4,16,64,256,1024,4096,8192').split(',')]:
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, 2880, device="cuda", generator=g).to(torch.bfloat16)
    ids, tw = qmoe.route(spec, torch.randn(M, 128, device="cuda", generator=g))
    out = torch.empty(M, 2880, dtype=torch.bfloat16, device="cuda")
    for cfg in CFGS:
        if cfg.block_m >= 64 and M < 4096 or cfg.block_m < 32 and M > 256 or cfg.block_m == 32 and (M < 1024 or M > 1024):
            continue
        st = {}
        try:
            fused_moe(x, ids, tw, kw, act.alpha, act.beta, act.limit, cfg, out, stats=st)
            t = measure(lambda: fused_moe(x, ids, tw, kw, act.alpha, act.beta, act.limit, cfg, out), device="cuda", reps=20)
        except Exception as e:
            print(M, cfg, "FAILED", repr(e)[:200]); continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fused_moe(x, ids, tw, kw, act.alpha, act.beta, act.limit, cfg, out)
            torch.cuda.synchronize()
        ker = {}
        for ev in prof.key_averages():
            if ev.device_type == torch.autograd.DeviceType.CUDA or getattr(ev, "device_time_total", 0):
                ker[ev.key[:40]] = round(getattr(ev, "device_time_total", 0) / 5, 1)
        row = dict(M=M, cfg=str(cfg), us=t["median_us"], method=t["method"], stats=st, kernels=ker)
        res.append(row)
        short = {k.replace("moe_", "").replace("_kernel", ""): v for k, v in ker.items() if k.startswith("moe_")}
        sp = (st["gemm1"]["regs"], st["gemm1"]["spills"], st["gemm2"]["regs"], st["gemm2"]["spills"])
        print(f"M={M:5d} {t['median_us']:9.1f} us bm{cfg.block_m} n{cfg.block_n1}/{cfg.block_n2} sw{int(cfg.swap)} "
              f"w{cfg.num_warps} u{cfg.k_unroll} regs/spills {sp} {short}")
json.dump(res, open(f"{OUT}/diag.json", "w"), indent=1)
