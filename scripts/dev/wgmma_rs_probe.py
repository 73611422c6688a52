"""Does Triton keep a decoded 4-bit weight in registers as the wgmma A operand? Compile a minimal
weight-first MXFP4-style GEMM for sm_90 on a machine without a GPU and print what the compiler
made of it (issue 14 groundwork).

    pip install --target /tmp/t36 --no-deps triton==3.6.0       # the GPU machine's Triton, once
    .venv/bin/python scripts/dev/wgmma_rs_probe.py

The kernel loads packed bytes [BN, BK/2] (two codes per byte along K), decodes each nibble to
bf16 with elementwise ops, interleaves low and high nibbles along K (join + reshape), and
computes dot(weight, x^T): the weight is the MMA's first operand. Printed per tile shape: the
warp_group_dot's operand types (a register dot_op operand is an RS wgmma; a memdesc is shared
memory), every local_alloc (tiles staged in shared memory), every convert_layout (layout changes;
between distributed layouts they go through shared memory scratch), and shared-memory
instruction counts in the PTX. Options: --triton /tmp/t36.
"""

import argparse
import re
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", default="/tmp/t36", help="folder holding Triton 3.6 (pip install --target)")
    args = ap.parse_args()
    sys.path.insert(0, args.triton)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def e2m1_to_bf16(c):
        """4-bit E2M1 codes (int) -> bf16 values, elementwise."""
        m = (c & 1).to(tl.float32)
        e = (c >> 1) & 3
        mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2((e - 1).to(tl.float32)))
        return tl.where((c & 8) != 0, -mag, mag).to(tl.bfloat16)

    @triton.jit
    def weight_first(w_ptr, x_ptr, o_ptr, K, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
        rn, rm = tl.arange(0, BN), tl.arange(0, BM)
        rb, rk = tl.arange(0, BK // 2), tl.arange(0, BK)
        acc = tl.zeros((BN, BM), tl.float32)
        for k0 in range(0, K, BK):
            b = tl.load(w_ptr + rn[:, None] * (K // 2) + k0 // 2 + rb[None, :])          # [BN, BK/2] u8
            w = tl.reshape(tl.join(e2m1_to_bf16(b & 15), e2m1_to_bf16(b >> 4)), (BN, BK))  # K interleaved
            x = tl.load(x_ptr + rm[:, None] * K + k0 + rk[None, :])                       # [BM, BK] bf16
            acc = tl.dot(w, tl.trans(x), acc)
        tl.store(o_ptr + rn[:, None] * BM + rm[None, :], acc)

    sig = {"w_ptr": "*u8", "x_ptr": "*bf16", "o_ptr": "*fp32", "K": "i32",
           "BN": "constexpr", "BK": "constexpr", "BM": "constexpr"}
    print(f"triton {triton.__version__}, target sm_90")
    for BN, BK, BM, warps in ((64, 64, 64, 4), (128, 64, 128, 8), (128, 128, 128, 8)):
        ck = triton.compile(ASTSource(fn=weight_first, signature=sig, constexprs={"BN": BN, "BK": BK, "BM": BM}),
                            target=GPUTarget("cuda", 90, 64), options={"num_warps": warps, "num_stages": 3})
        ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
        print(f"\nBN={BN} BK={BK} BM={BM} num_warps={warps}")
        for line in ttgir.splitlines():
            s = line.strip()
            if ("warp_group_dot " in s and "wait" not in s) or "local_alloc" in s or "convert_layout" in s:
                s = re.sub(r" loc\(.*\)$", "", s)
                print("  " + (s if len(s) < 240 else s[:237] + "..."))
        print(f"  PTX: {len(re.findall(r'wgmma.mma_async', ptx))} wgmma, {len(re.findall(r'st.shared', ptx))} "
              f"st.shared, {len(re.findall(r'ld.shared', ptx))} ld.shared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
