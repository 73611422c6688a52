"""Compile moe_gemm1_kernel (GEMM1 + SwiGLU) of two revisions for sm_90 on a machine without a
GPU and say whether their PTX instructions are the same (debug info and labels aside).

    pip install --target /tmp/t36 --no-deps triton==3.6.0       # the GPU machine's Triton, once
    .venv/bin/python scripts/dev/ptx_same.py 2456703             # that revision against the tree

For a change that should not change the code the GPU runs (a refactor of a @triton.jit helper,
say): identical instructions mean the GPU measurements taken before it still hold. Compiles one
decode configuration (mxfp4, block_m 16, block_n 64, k_unroll 4, 4 warps, 3 stages), with and
without the SwiGLU limit; exits 1 when they differ. Options: --triton /tmp/t36 (where Triton 3.6 lies).
"""

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
GEMM1 = {"x_ptr": "*bf16", "stride_xm": "i32", "w_ptr": "*u8", "s_ptr": "*u8", "gs_ptr": "*fp32", "b_ptr": "*fp32",
         "inter_ptr": "*bf16", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "ids_ptr": "*i32", "MK": "i32",
         "E": "i32", "H": "i32", "Ip": "i32", "Kp": "i32", "top_k": "i32", "n_tiles": "i32", "KB": "i32",
         "WE": "i32", "WR": "i32", "WP": "i32", "NSC": "i32", "alpha": "fp32", "beta": "fp32", "limit": "fp32",
         "part_ptr": "*fp32", "lock_ptr": "*i32", "part_stride": "i32"}
NEW_CONSTEXPRS = {"SPLIT": 1, "WORDS": False, "PB": 64}
"""Constexprs a later revision added, at the value that keeps the earlier code path."""


def load_revision(rev: str, tmp: str):
    """The kernels module of git revision `rev`, loaded as a package beside its siblings."""
    pkg = os.path.join(tmp, "rev_kernels")
    os.makedirs(pkg)
    names = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", rev, "src/qmoe/kernels/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for path in names:
        if path.endswith(".py"):
            text = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True, capture_output=True,
                                  text=True).stdout
            with open(os.path.join(pkg, os.path.basename(path)), "w") as f:
                f.write(text)
    sys.path.insert(0, tmp)
    import rev_kernels._moe_kernels as mod

    return mod


def instructions(ptx: str) -> list:
    """The PTX's instruction lines; parameter declarations dropped and parameter numbers erased,
    so that a kernel that only gained arguments (unused on this path) compares equal."""
    code = ptx.split(".section\t.debug")[0].split(".section .debug")[0]
    return [re.sub(r"_param_\d+", "_param_N", ln) for ln in code.splitlines()
            if ln.strip() and not ln.strip().startswith(("//", ".file", ".loc", "$L__tmp", ".param"))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revision", help="git revision to compare the working tree with")
    ap.add_argument("--triton", default="/tmp/t36", help="folder holding Triton 3.6 (pip install --target)")
    args = ap.parse_args()
    sys.path.insert(0, args.triton)
    sys.path.insert(1, os.path.join(ROOT, "src"))
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import qmoe.kernels._moe_kernels as tree

    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(args.revision, tmp)
        same = True
        for limit in (False, True):
            const = dict(FMT=0, G=32, HAS_BIAS=True, HAS_LIMIT=limit, BM=16, BN=64, SWAP=False, CDT=tl.bfloat16,
                         ASM=True, U=4, FOLD=True, DIRECT=False, MKP=16, PDL=False)
            ptx = []
            for mod in (old, tree):
                fn = mod.moe_gemm1_kernel
                cx = dict(const, **{k: v for k, v in NEW_CONSTEXPRS.items() if k in fn.arg_names})
                sig = {a: "constexpr" if a in cx else GEMM1[a] for a in fn.arg_names}
                ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx),
                                    target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": 3})
                ptx.append(instructions(ck.asm["ptx"]))
            ok = ptx[0] == ptx[1]
            same &= ok
            print(f"triton {triton.__version__}, sm_90, moe_gemm1_kernel HAS_LIMIT={limit}: "
                  f"{len(ptx[1])} PTX lines, {'identical' if ok else 'DIFFERENT'} to {args.revision}")
            if not ok:
                print("\n".join(list(difflib.unified_diff(ptx[0], ptx[1], lineterm="", n=0))[:40]))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
