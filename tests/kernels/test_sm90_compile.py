"""The GEMMs compiled for sm_90 on this machine (no GPU needed): the property the kernel layout
exists for (kernels/layout.py, docs/performance.md session 7) holds. Every MMA operand keeps
mma.sync's native bf16 register layout (kWidth 2): Triton picks kWidth from the narrowest element
loaded into an operand, so a uint8 weight load anywhere would make it 4. The activations then
leave shared memory by ldmatrix, not by 8-byte loads (which the scales' 64-bit words may take).

Runs scripts/dev/sass_loop.py in a subprocess: the test session has TRITON_INTERPRET set, under
which the kernels cannot be compiled."""

import os
import re
import subprocess
import sys

import pytest
import triton

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SITE = os.path.dirname(os.path.dirname(os.path.abspath(triton.__file__)))
PTXAS = os.path.join(SITE, "triton", "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton has no NVIDIA backend with ptxas")
@pytest.mark.parametrize("kernel", ["gemm1", "gemm2"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_mma_operands_keep_the_native_layout(tmp_path, kernel, fmt):
    ttgir = tmp_path / "k.ttgir"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "dev", "sass_loop.py"), "--triton", SITE,
                          "--kernel", kernel, "--fmt", fmt, "--ttgir", str(ttgir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    widths = re.findall(r"kWidth = (\d+)", ttgir.read_text())
    assert widths and set(widths) == {"2"}, f"dot operand kWidths {sorted(set(widths))}"
    mma = int(re.search(r"(\d+) MMA", run.stdout).group(1))
    mio = next(line for line in run.stdout.splitlines() if line.strip().startswith("shared-memory:"))
    lds64 = re.search(r"LDS\.64 (\d+)", mio)
    # x read by 8-byte loads takes at least mma / 2 of them per loop iteration (every warp reads
    # the whole tile); the scales' 64-bit words take mma / 8 at most (int4, nvfp4: exactly that)
    assert "LDSM" in mio and (lds64 is None or int(lds64.group(1)) <= mma // 8), mio


def register_operand_pattern(ptx: str) -> bool:
    """Whether every wgmma whose first operand is in registers takes them from copies made before
    its `wgmma.fence` (since the wait before it), and no wait leaves more than one wgmma group in
    flight: the pattern of the fix of triton-lang/triton#9433."""
    lines = ptx.splitlines()
    waits = [int(m.group(1)) for m in (re.search(r"wgmma\.wait_group\.sync\.aligned (\d+)", ln) for ln in lines) if m]
    copied = []
    for i, ln in enumerate(lines):
        m = re.search(r"wgmma\.mma_async\S* \{[^}]*\}, \{(%r\d+)[^}]*\}", ln)
        if m:
            fence = max((j for j in range(i) if "wgmma.fence" in lines[j]), default=0)
            since = max((j for j in range(fence) if "wgmma.wait_group" in lines[j]), default=0)
            copied.append(any(re.search(rf"mov\.b32\s+{m.group(1)},", lines[j]) for j in range(since, fence)))
    return bool(copied) and all(copied) and max(waits, default=0) <= 1


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton has no NVIDIA backend with ptxas")
def test_register_wgmma_hazard_names_this_triton_rightly(tmp_path):
    """kernels.register_wgmma_hazard says whether this Triton carries the fix of its race on wgmma
    register operands by version; the weight-first GEMM2's PTX (nvfp4, 128 x 64 tiles, 3 stages:
    qwen3-30b-a3b's prefill entry, where Triton 3.6's race showed) says it by the code."""
    from qmoe.kernels import register_wgmma_hazard

    ptx = tmp_path / "k.ptx"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "dev", "sass_loop.py"), "--triton", SITE,
                          "--kernel", "gemm2", "--fmt", "nvfp4", "--block-m", "128", "--block-n", "64", "--k-unroll",
                          "2", "--stages", "3", "--swap", "1", "--ptx", str(ptx)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert register_operand_pattern(ptx.read_text()) == (register_wgmma_hazard(triton.__version__) is None)


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton has no NVIDIA backend with ptxas")
@pytest.mark.parametrize("kernel,fmt,bm,bn,warps,unroll", [
    ("gemm1", "int4", 128, 128, 8, 2), ("gemm2", "int4", 128, 128, 8, 2),     # kimi-k2.5's prefill tiles
    ("gemm1", "mxfp4", 128, 64, 4, 2), ("gemm2", "mxfp4", 128, 64, 4, 2),     # gpt-oss-120b's
    ("gemm1", "nvfp4", 128, 64, 4, 4), ("gemm2", "nvfp4", 128, 64, 4, 4)])    # nvfp4 at k_unroll 4
def test_which_weight_first_kernels_keep_wgmmas_in_flight(tmp_path, kernel, fmt, bm, bn, warps, unroll):
    """What register_wgmma_hazard's message claims: the race needs wgmmas left in flight past a
    wait, and of the weight-first kernels only nvfp4's at k_unroll 2 (one MMA per quad of K) leave
    any (Triton 3.6: up to 7 in GEMM1, 3 in GEMM2; scripts/dev/compile_table.py, session 17). These
    wait for every wgmma, on 3.6 and 3.9 alike, though their first operand is in registers."""
    ptx = tmp_path / "k.ptx"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "dev", "sass_loop.py"), "--triton", SITE,
                          "--kernel", kernel, "--fmt", fmt, "--block-m", str(bm), "--block-n", str(bn), "--warps",
                          str(warps), "--k-unroll", str(unroll), "--stages", "3", "--swap", "1", "--ptx", str(ptx)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = ptx.read_text()
    assert re.search(r"wgmma\.mma_async\S* \{[^}]*\}, \{%r", text), "expected wgmmas with a register operand"
    waits = {int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", text)}
    assert waits == {0}, f"waits leave {sorted(waits)} wgmma groups in flight"


def test_register_wgmma_hazard_by_version():
    from qmoe.kernels import register_wgmma_hazard

    assert "triton-lang/triton#9433" in register_wgmma_hazard("3.6.0")
    assert register_wgmma_hazard("3.8.1") is not None
    assert register_wgmma_hazard("3.9.0") is None and register_wgmma_hazard("4.0.0") is None
    assert register_wgmma_hazard("nightly") is None
