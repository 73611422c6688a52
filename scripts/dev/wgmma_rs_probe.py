"""Does Triton keep a decoded 4-bit weight in registers as the wgmma A operand? Compile minimal
weight-first MXFP4-style GEMMs for sm_90 on a machine without a GPU and print what the compiler
made of them (issue 14 groundwork).

    pip install --target /tmp/t36 --no-deps triton==3.6.0       # the GPU machine's Triton, once
    .venv/bin/python scripts/dev/wgmma_rs_probe.py [--layouts]

Two kernels, both computing dot(weight, x^T) (the weight is the MMA's first operand) from packed
bytes (two E2M1 codes per byte along K) decoded elementwise to bf16, the low and high nibbles
joined along K:
- plain: the bytes row-major, [N, K/2];
- swizzled: per 16 rows x 64 K (32 bytes), the 512 bytes in the order the derived register layout
  of the bytes wants them: lane l = 4 * (row % 8) + (byte % 4) owns 16 consecutive bytes, element
  2 * (byte // 4) + (row // 8 % 2); the kernel undoes it with reshape / permute (no data movement
  when the layouts line up).
Printed per tile shape: the warp_group_dot's operands (a register dot_op operand: RS wgmma; a
memdesc: shared memory), the local_allocs (pipeline buffers and staged tiles), the
convert_layouts, and shared-memory instruction counts in the PTX. Arguments are marked divisible
by 16, as qmoe's launches make them (without that Triton neither vectorizes nor pipelines).
Options: --triton /tmp/t36, --layouts (their definitions too).
"""

import argparse
import re
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", default="/tmp/t36", help="folder holding Triton 3.6 (pip install --target)")
    ap.add_argument("--layouts", action="store_true", help="also print the layouts' definitions")
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
    def plain(w_ptr, x_ptr, o_ptr, K, BN: tl.constexpr, BM: tl.constexpr):
        BK: tl.constexpr = 64
        rn, rm, rb, rk = tl.arange(0, BN), tl.arange(0, BM), tl.arange(0, BK // 2), tl.arange(0, BK)
        acc = tl.zeros((BN, BM), tl.float32)
        for k0 in range(0, K, BK):
            b = tl.load(w_ptr + rn[:, None] * (K // 2) + k0 // 2 + rb[None, :])            # [BN, 32] u8
            w = tl.reshape(tl.join(e2m1_to_bf16(b & 15), e2m1_to_bf16(b >> 4)), (BN, BK))
            x = tl.load(x_ptr + rm[:, None] * K + k0 + rk[None, :])
            acc = tl.dot(w, tl.trans(x), acc)
        tl.store(o_ptr + rn[:, None] * BM + rm[None, :], acc)

    @triton.jit
    def swizzled(w_ptr, x_ptr, o_ptr, K, BN: tl.constexpr, BM: tl.constexpr):
        BK: tl.constexpr = 64
        rt, rj, rm, rk = tl.arange(0, BN // 16), tl.arange(0, 512), tl.arange(0, BM), tl.arange(0, BK)
        acc = tl.zeros((BN, BM), tl.float32)
        for k0 in range(0, K, BK):   # w: [N/16, K/64, 512]
            s = tl.load(w_ptr + rt[:, None] * (K // 64) * 512 + (k0 // 64) * 512 + rj[None, :])
            s = tl.permute(tl.reshape(s, (BN // 16, 8, 4, 8, 2)), (0, 4, 1, 3, 2))  # t, h, row%8, byte//4, byte%4
            b = tl.reshape(s, (BN, 32))
            w = tl.reshape(tl.join(e2m1_to_bf16(b & 15), e2m1_to_bf16(b >> 4)), (BN, BK))
            x = tl.load(x_ptr + rm[:, None] * K + k0 + rk[None, :])
            acc = tl.dot(w, tl.trans(x), acc)
        tl.store(o_ptr + tl.arange(0, BN)[:, None] * BM + rm[None, :], acc)

    sig = {"w_ptr": "*u8", "x_ptr": "*bf16", "o_ptr": "*fp32", "K": "i32", "BN": "constexpr", "BM": "constexpr"}
    div16 = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    print(f"triton {triton.__version__}, target sm_90")
    for name, fn in (("plain", plain), ("swizzled", swizzled)):
        for BN, BM, warps in ((64, 64, 4), (128, 128, 8)):
            ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BN": BN, "BM": BM}, attrs=div16),
                                target=GPUTarget("cuda", 90, 64), options={"num_warps": warps, "num_stages": 3})
            ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
            print(f"\n{name}: BN={BN} BK=64 BM={BM} num_warps={warps}")
            for line in ttgir.splitlines():
                s = line.strip()
                if ("warp_group_dot " in s and "wait" not in s) or "local_alloc" in s or "convert_layout" in s:
                    s = re.sub(r" loc\(.*\)$", "", s)
                    print("  " + (s if len(s) < 200 else s[:197] + "..."))
                if args.layouts and line.startswith(("#linear", "#blocked", "#mma")):
                    print("  " + line)
            print(f"  PTX: {len(re.findall(r'wgmma.mma_async', ptx))} wgmma, "
                  f"{len(re.findall(r'cp.async.(?:ca|cg)', ptx))} cp.async, {len(re.findall(r'st.shared', ptx))} "
                  f"st.shared, {len(re.findall(r'ld.shared', ptx))} ld.shared "
                  f"({len(re.findall(r'ld.shared.v4', ptx))} of them 16-byte)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
