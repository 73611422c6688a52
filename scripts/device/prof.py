"""One launch of each GEMM for ncu, plus a SASS histogram of the compiled kernels (-> $OUT)."""
import collections, os, re, sys
import torch
sys.path.insert(0, "src")
import qmoe
from qmoe.backends import get_backend
from qmoe.weights import random_weights
from qmoe.kernels.moe import KernelConfig as C, fused_moe
import qmoe.kernels._moe_kernels as K

OUT = os.environ.get("OUT", "out")
spec = qmoe.presets["gpt-oss-120b"]
w = random_weights(spec, "mxfp4", "cuda", bias_std=0.5)
prep = get_backend("triton").prepare(spec, w)
kw, act = prep.meta["kernel_weights"], spec.activation
M = int(os.environ.get("PROF_M", "1"))
cfg = C(16, 64, 64, False, 4, 3, 4) if M <= 256 else C(128, 128, 64, False, 8, 3, 2)  # H100 table
x = torch.randn(M, 2880, device="cuda").to(torch.bfloat16)
ids, tw = qmoe.route(spec, torch.randn(M, 128, device="cuda"))
out = torch.empty(M, 2880, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    fused_moe(x, ids, tw, kw, act.alpha, act.beta, act.limit, cfg, out)
torch.cuda.synchronize()
if os.environ.get("DUMP_SASS"):
    for name, jf in (("gemm1", K.moe_gemm1_kernel), ("gemm2", K.moe_gemm2_kernel)):
        for dev_cache in jf.device_caches.values():
            for ck in dev_cache[0].values():
                sass = ck.asm.get("sass", "")
                ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M))
                open(f"{OUT}/{name}_M{M}.sass", "w").write(sass)
                base = collections.Counter()
                for k, v in ops.items():
                    base[k.split(".")[0]] += v
                print(name, "instructions:", sum(ops.values()), dict(base.most_common(25)))
