"""Compile qmoe's GEMM kernels for sm_90 on a machine without a GPU and count the instructions
of the main K loop in SASS: all of them, the MMAs, and the shared-memory (MIO) ones, which the
session-6 counters found to be what the decode GEMMs wait on (docs/performance.md).

    pip install --target /tmp/t36 --no-deps triton==3.6.0       # the GPU machine's Triton, once
    .venv/bin/python scripts/dev/sass_loop.py --kernel gemm1 --fmt nvfp4
    .venv/bin/python scripts/dev/sass_loop.py --kernel gemm2 --fmt int4 --block-n 128 --words 0

Arguments carry the divisibility facts a real launch gives Triton (pointers and row strides
divisible by 16; without them the same source compiles to one-byte loads). The main loop is the
loop with the most MMAs (then cp.async, then length). Options: --block-m, --block-n, --k-unroll, --warps,
--stages, --split, --whole (whole_k), --words (the scales' loads: 2 = 32- and 64-bit, 1 = 32-bit but int4's
64-bit pairs, 0 = one per scale), --swap (1: the weight first), --triton (where Triton 3.6
lies), --sass FILE (keep the whole SASS), --ttgir FILE (keep the TTGIR, for the layouts), --ptx FILE.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FORMATS = {"mxfp4": (0, 32, "*u8"), "nvfp4": (1, 16, "*u8"), "int4": (2, 32, "*i16")}
"""format -> (FMT code, G, the scales' pointer type)."""
TYPES = {"x_ptr": "*bf16", "inter_ptr": "*bf16", "w_ptr": "*u8", "gs_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32",
         "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "topk_w_ptr": "*fp32", "ids_ptr": "*i32",
         "part_ptr": "*fp32", "lock_ptr": "*i32", "alpha": "fp32", "beta": "fp32", "limit": "fp32"}
DIVISIBLE = {"x_ptr", "w_ptr", "s_ptr", "gs_ptr", "b_ptr", "inter_ptr", "y_ptr", "sorted_ptr", "block_expert_ptr",
             "ids_ptr", "topk_w_ptr", "part_ptr", "lock_ptr", "stride_xm", "H", "Hp", "Ip", "Kp", "WE", "WR", "WP",
             "part_stride", "y_split_stride"}
"""Arguments a launch makes divisible by 16 (NSC, the scale row stride, is not always)."""
MIO = ("LDS", "LDSM", "STS", "LDGSTS", "BAR", "LDGDEPBAR", "DEPBAR", "SHFL")


def compile_kernel(args):
    sys.path.insert(0, args.triton)
    sys.path.insert(1, os.path.join(ROOT, "src"))
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import qmoe.kernels._moe_kernels as K

    fmt, G, s_type = FORMATS[args.fmt]
    const = dict(FMT=fmt, G=G, HAS_BIAS=True, BM=args.block_m, BN=args.block_n, SWAP=bool(args.swap),
                 CDT=tl.bfloat16, ASM=True, U=args.k_unroll, FOLD=True, DIRECT=False, MKP=16, PDL=False,
                 SPLIT=args.split, WORDS=args.words, PB=64)
    if args.kernel == "gemm1":
        fn = K.moe_gemm1_kernel
        const.update(HAS_LIMIT=True, WHOLE=bool(args.whole), STREAM=bool(args.stream))
    else:
        fn = K.moe_gemm2_kernel
    sig = {a: "constexpr" if a in const else ({**TYPES, "s_ptr": s_type}).get(a, "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in DIVISIBLE if a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 64),
                          options={"num_warps": args.warps, "num_stages": args.stages})


def disassemble(ck, triton_dir: str) -> tuple[str, str]:
    """(SASS, resource usage) of a compiled kernel, by the cuobjdump of the Triton in triton_dir."""
    cuobjdump = os.path.join(triton_dir, "triton", "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", cubin], check=True, capture_output=True, text=True).stdout
    return sass, res


def main_loop(sass: str) -> list[str]:
    """The instructions (opcode and operands) of the main K loop: of the loops (backward
    branches), the one with the most MMAs, then the most cp.async (the pipelined main loop rather
    than the kernels' unpipelined remainder loop, which can be longer: the weight-first ones),
    then the longest; a backward branch whose span holds an EXIT is out-of-line code (TMA's
    mbarrier waits retry after the kernel's end), not a loop."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s*(.*?);", line) for line in sass.splitlines()) if m]
    best, best_key = None, None
    for addr, text in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if any(t.startswith("EXIT") for t in body):   # a jump back from out-of-line code (an mbarrier's
                continue                                   # retry after the kernel's end): no loop
            key = (sum("MMA" in t for t in body), sum("LDGSTS" in t for t in body), len(body))
            if best_key is None or key > best_key:
                best, best_key = body, key
    if best is None:
        raise SystemExit("no loop found in the SASS")
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("gemm1", "gemm2"), default="gemm1")
    ap.add_argument("--fmt", choices=sorted(FORMATS), default="mxfp4")
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--k-unroll", type=int, default=4)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--split", type=int, default=1)
    ap.add_argument("--whole", type=int, choices=(0, 1), default=0, help="KernelConfig.whole_k (GEMM1)")
    ap.add_argument("--stream", type=int, choices=(0, 1), default=0, help="KernelConfig.stream_k1 > 0 (GEMM1)")
    ap.add_argument("--words", type=int, choices=(0, 1, 2), default=2)
    ap.add_argument("--swap", type=int, choices=(0, 1), default=0, help="the weight as the MMA's first operand")
    ap.add_argument("--triton", default="/tmp/t36")
    ap.add_argument("--sass", help="write the whole SASS here")
    ap.add_argument("--ttgir", help="write the TTGIR here")
    ap.add_argument("--ptx", help="write the PTX here")
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.triton, "triton")):
        raise SystemExit(f"no Triton under {args.triton}: pip install --target {args.triton} --no-deps triton==3.6.0")
    ck = compile_kernel(args)
    sass, res = disassemble(ck, args.triton)
    for path, text in ((args.sass, sass), (args.ttgir, ck.asm["ttgir"]), (args.ptx, ck.asm["ptx"])):
        if path:
            with open(path, "w") as f:
                f.write(text)
    loop = main_loop(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in loop)
    mio = {k: v for k, v in ops.items() if k.startswith(MIO)}
    mma = sum(v for k, v in ops.items() if "MMA" in k)
    regs = re.findall(r"REG:(\d+)", res)
    print(f"{args.kernel} {args.fmt} {args.block_m}x{args.block_n} k_unroll {args.k_unroll} words {args.words} "
          f"warps {args.warps} stages {args.stages} swap {args.swap} whole {args.whole}: registers "
          f"{regs[0] if regs else '?'}, shared "
          f"{ck.metadata.shared} B; loop {len(loop)} instructions, {mma} MMA, {sum(mio.values())} shared-memory")
    print("  shared-memory:", " ".join(f"{k} {v}" for k, v in sorted(mio.items(), key=lambda kv: -kv[1])))
    print("  most frequent:", " ".join(f"{k} {v}" for k, v in ops.most_common(12)))


if __name__ == "__main__":
    main()
