#!/usr/bin/env python3
"""GPU check of qmoe's flashinfer_cutlass backend (FlashInfer SM90 MXFP4 W4A16) against
qmoe's float64 reference at gpt-oss-120b shapes (E=128, top-4, H=I=2880, GPT-OSS SwiGLU,
biases), M in {1, 64, 1024}: relative error, a repeat run (a moving result means a race),
and microseconds per call, eager and CUDA-graph replayed. JSON goes to $OUT (or --out),
a short table is printed last.

On the GPU machine, from the repository root, carrying the git-ignored .whl/ folder
(flashinfer-python and apache-tvm-ffi wheels, see docs/flashinfer.md):

    python3 scripts/device/flashinfer_check.py auto --wheels .whl --budget 540

FlashInfer JIT-compiles its SM90 MoE module with nvcc at first use; even the reduced
build (bf16 x MXFP4 kernels only, below) takes longer than one 10-minute command. `auto`
is idempotent: it installs the wheels (once), starts the build in the background (once),
waits for it until the budget is spent, and runs the check when the build is there.
Repeat the same command on the same (still warm) machine until the table appears.

Sub-commands: install, build [--background], wait, check, auto. State (installed wheels,
build log and status) lives in --state (default /tmp/qmoe_fi_check).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

MS = (1, 64, 1024)
CHECK_RESERVE_S = 150  # what `check` needs after the build (module load, reference, timings)
# Known-long translation units first: ninja starts edges in manifest order, so the build's
# tail is shorter when the slowest start early (measured on an H100 host, 16 jobs).
HEAVY_FIRST = ("cutlass_fused_moe_instantiation.cu", "flashinfer_cutlass_fused_moe_binding.cu",
               "fp8_blockscale_gemm.cu", "moe_gemm_kernels_bf16_fp4.cu")
BF16_X_FP4_LAUNCHER = re.compile(r"kernelLauncher<\s*__nv_bfloat16\s*,\s*SafeFP4")
W4A16_RUNNER = "moe_gemm_kernels_bf16_fp4.cu"


def log(*a):
    print(*a, flush=True)


# --- state and installation --------------------------------------------------------------------
def site(args) -> Path:
    return Path(args.state) / "site"


def use_site(args) -> None:
    if site(args).is_dir() and str(site(args)) not in sys.path:
        sys.path.insert(0, str(site(args)))


def flashinfer_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("flashinfer") is not None


def cmd_install(args) -> None:
    use_site(args)
    if flashinfer_importable():
        log("flashinfer already importable; nothing to install")
        return
    wheels = sorted(glob.glob(os.path.join(args.wheels or "", "*.whl")))
    if not wheels:
        sys.exit(f"flashinfer is not installed and no wheels found in {args.wheels!r} (see docs/flashinfer.md)")
    site(args).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site(args)), *wheels], check=True)
    use_site(args)
    log(f"installed {', '.join(os.path.basename(w) for w in wheels)} into {site(args)}")


# --- the reduced SM90 build ---------------------------------------------------------------------
def keep_source(path: str, level: str) -> bool:
    """Whether the SM90 MoE module's source `path` is compiled at this reduction level.

    conservative: drop the dense mixed-input GEMM instantiations (the MoE module never calls
        them) and the mixed-input grouped GEMMs of other activation types (fp8 x int4, fp8 x
        fp4): they are only called directly, so under lazy symbol binding they stay
        unresolved and are never reached on the bf16 path.
    aggressive: also drop the MoE runners of every dtype pair but bf16 x fp4 and the
        same-dtype grouped GEMMs only those runners use.
    The bf16 x MXFP4 kernels themselves are compiled exactly as in the full build, and the
    tactic heuristics are always built, so tactic choice is unchanged.
    """
    name = os.path.basename(path)
    if path.endswith(".generated.cu"):
        if "/gemm_grouped/" not in path:
            return False
        if "_Mixed_" in name:
            return bool(BF16_X_FP4_LAUNCHER.search(Path(path).read_text()))
        return level == "conservative"
    if level == "aggressive" and name.startswith("moe_gemm_kernels_"):
        return name == W4A16_RUNNER
    return True


def reduce_sm90_build(level: str) -> None:
    """Make FlashInfer build (and, later, load) its SM90 MoE module from the reduced source
    list. Build and check must use the same level: the source list is part of the ninja
    file, and a different one would start a full rebuild."""
    if level == "none":
        return
    import flashinfer.fused_moe.core as core

    full = getattr(core, "_qmoe_full_sm90_spec", core.gen_cutlass_fused_moe_sm90_module)

    def reduced(use_fast_build=False):
        spec = full(use_fast_build)
        kept = [s for s in spec.sources if keep_source(str(s), level)]
        n = len(HEAVY_FIRST)
        rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
        # the named heavy files first, then the generated kernels, then the rest (sort is stable)
        kept.sort(key=lambda s: rank.get(os.path.basename(str(s)), n if str(s).endswith(".generated.cu") else n + 1))
        log(f"SM90 MoE module, {level} build: {len(kept)} of {len(spec.sources)} sources")
        spec.sources = kept
        return spec

    core._qmoe_full_sm90_spec = full
    core.gen_cutlass_fused_moe_sm90_module = reduced


def build_env() -> dict:
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    env["FLASHINFER_JIT_DEBUG"] = "0"  # FLASHINFER_JIT_VERBOSE=1 alone would switch to -O0 -G builds
    env.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def status_file(args) -> Path:
    return Path(args.state) / "build.json"


def read_status(args) -> dict | None:
    try:
        return json.loads(status_file(args).read_text())
    except (OSError, ValueError):
        return None


def cmd_build(args) -> None:
    Path(args.state).mkdir(parents=True, exist_ok=True)
    if args.background:
        if build_running(args):
            log("a build is already running")
            return
        status_file(args).unlink(missing_ok=True)
        logf = open(Path(args.state) / "build.log", "w")
        proc = subprocess.Popen([sys.executable, __file__, "build", "--state", args.state, "--reduced", args.reduced],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=build_env(), start_new_session=True)
        (Path(args.state) / "build.pid").write_text(str(proc.pid))
        log(f"build started in the background (pid {proc.pid}, log {args.state}/build.log)")
        return
    os.environ.update(build_env())
    use_site(args)
    import flashinfer

    t0 = time.time()
    level, first_error = args.reduced, None
    reduce_sm90_build(level)
    import flashinfer.fused_moe.core as core
    try:
        core.get_cutlass_fused_moe_module("90")
    except Exception as e:  # an aggressive build can miss a symbol some FlashInfer release needs
        first_error = repr(e)[-2000:]
        if level != "aggressive":
            status_file(args).write_text(json.dumps({"ok": False, "level": level, "error": first_error}))
            raise
        log(f"aggressive build failed to load ({first_error[-300:]}); trying conservative")
        level = "conservative"
        reduce_sm90_build(level)
        core.get_cutlass_fused_moe_module("90")
    seconds = time.time() - t0
    status_file(args).write_text(json.dumps({"ok": True, "level": level, "seconds": seconds,
                                             "flashinfer": flashinfer.__version__, "first_error": first_error,
                                             "max_jobs": os.environ.get("MAX_JOBS")}))
    log(f"BUILD DONE in {seconds:.0f} s ({level})")


def build_running(args) -> bool:
    try:
        pid = int((Path(args.state) / "build.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return read_status(args) is None


def progress(args) -> str:
    try:
        text = (Path(args.state) / "build.log").read_text(errors="replace")
    except OSError:
        return "?"
    steps = re.findall(r"^\[(\d+)/(\d+)\]", text, re.M)
    return f"{steps[-1][0]}/{steps[-1][1]}" if steps else "starting"


def wait_build(args, timeout: float) -> dict | None:
    """The build status once the build finished, or None at the timeout."""
    t0, last = time.time(), 0.0
    while time.time() - t0 < timeout:
        st = read_status(args)
        if st is not None:
            return st
        if not build_running(args):
            tail = (Path(args.state) / "build.log").read_text(errors="replace")[-3000:] \
                if (Path(args.state) / "build.log").exists() else ""
            return {"ok": False, "error": "build process ended without a status", "log_tail": tail}
        if time.time() - last >= 60:
            log(f"  t={time.time() - t0:.0f}s build step {progress(args)}")
            last = time.time()
        time.sleep(5)
    return None


def cmd_wait(args) -> None:
    st = wait_build(args, args.timeout)
    log(json.dumps(st) if st else f"build still running at step {progress(args)}")


# --- the check ------------------------------------------------------------------------------------
def random_mxfp4_weights(spec, device, seed=0):
    """Random canonical MXFP4 weights: uniform code bytes, E8M0 scales 2^-9..2^-5, fp32 biases."""
    import torch
    import qmoe

    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size

    def q(rows, cols):
        data = torch.randint(0, 256, (E, rows, cols // 2), dtype=torch.uint8, device=device, generator=g)
        scales = torch.randint(118, 123, (E, rows, cols // 32), dtype=torch.uint8, device=device, generator=g)
        return qmoe.QuantizedTensor("mxfp4", (E, rows, cols), data, scales)
    b13 = 0.5 * torch.randn(E, 2 * I, device=device, generator=g)
    b2 = 0.5 * torch.randn(E, H, device=device, generator=g)
    return qmoe.ExpertWeights(q(2 * I, H), q(H, I), b13, b2)


def inputs(spec, M, device, seed):
    import torch

    g = torch.Generator(device=device).manual_seed(1000 + seed)
    x = torch.randn(M, spec.hidden_size, device=device, generator=g).to(torch.bfloat16)
    ids = torch.rand(M, spec.num_experts, device=device, generator=g).topk(spec.top_k, dim=1).indices.int()
    w = torch.softmax(torch.randn(M, spec.top_k, device=device, generator=g), dim=1)
    return x, ids, w


def median_us(fn, iters=50, warmup=5) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def graph_us(fn) -> tuple[float | None, str | None]:
    import torch

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return median_us(graph.replay), None
    except Exception as e:  # report a capture failure instead of dying: eager timing still stands
        return None, repr(e)[:500]


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def versions() -> dict:
    import torch

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
         "device": torch.cuda.get_device_name(0)}
    try:
        import flashinfer
        v["flashinfer"] = flashinfer.__version__
    except Exception as e:  # noqa: BLE001 - the check reports what it could not import
        v["flashinfer"] = repr(e)
    try:
        import tvm_ffi
        v["tvm_ffi"] = getattr(tvm_ffi, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    return v


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def cmd_check(args) -> dict:
    use_site(args)
    st = read_status(args) or {}
    level = st.get("level", args.reduced)
    reduce_sm90_build(level)
    import torch

    import qmoe

    torch.backends.cuda.matmul.allow_tf32 = False
    res = check(args, qmoe.presets["gpt-oss-120b"], torch.device("cuda"), versions())
    res.update(build=st, reduced=level)
    write_json(args, res)
    print_table(res)
    return res


def check(args, spec, dev, vers) -> dict:
    """Correctness and timing of flashinfer_cutlass for `spec` on `dev`, per M in args.ms."""
    import torch

    from qmoe.backends import get_backend
    from qmoe.backends.reference import reference_moe

    backend = get_backend("flashinfer_cutlass")
    sup = backend.supports(spec, "mxfp4", dev)
    res = {"versions": vers, "support": sup.reason,
           "shape": {"preset": spec.name, "E": spec.num_experts, "top_k": spec.top_k,
                     "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
                     "swiglu": [spec.activation.alpha, spec.activation.beta, spec.activation.limit]},
           "weights": "random MXFP4 codes, E8M0 scales 2^-9..2^-5, fp32 biases N(0, 0.25)", "rows": []}
    log(json.dumps(vers))
    log(f"flashinfer_cutlass supports {spec.name} mxfp4 on {dev}: {sup.ok} ({sup.reason})")
    if not sup.ok:
        write_json(args, res)
        sys.exit(1)
    weights = random_mxfp4_weights(spec, dev)
    t0 = time.time()
    prepared = backend.prepare(spec, weights)
    sync(dev)
    res["prepare_s"] = time.time() - t0  # includes loading the JIT-built module
    res["prepared_meta"] = {k: v for k, v in prepared.meta.items() if k != "quant_scales"}
    log(f"prepare: {res['prepare_s']:.1f} s, layout {prepared.nbytes / 2**30:.2f} GiB, meta {res['prepared_meta']}")
    for M in args.ms:
        x, ids, w = inputs(spec, M, dev, seed=M)
        out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device=dev)
        backend.forward(prepared, x, ids, w, out)
        sync(dev)
        row = {"M": M, "active_experts": int(torch.unique(ids).numel()),
               "all_finite": bool(torch.isfinite(out).all())}
        ref = reference_moe(spec, weights, x, ids, w, dtype=torch.float64)
        row["rel_err"] = rel_err(out.nan_to_num(1e30), ref)
        again = torch.full_like(out, float("nan"))
        backend.forward(prepared, x, ids, w, again)
        sync(dev)
        row["rel_err_repeat"] = rel_err(again.nan_to_num(1e30), ref)
        row["max_abs_diff_repeat"] = (again.float() - out.float()).abs().max().item()
        del ref, again
        buf = torch.empty_like(out)

        def call():
            backend.forward(prepared, x, ids, w, buf)
        row["eager_us"] = median_us(call)
        row["graph_us"], row["graph_error"] = graph_us(call)
        res["rows"].append(row)
        graph = "failed" if row["graph_us"] is None else f"{row['graph_us']:.1f} us"
        log(f"M={M}: rel err {row['rel_err']:.2e} (repeat {row['rel_err_repeat']:.2e}, max |diff| "
            f"{row['max_abs_diff_repeat']:.2e}), eager {row['eager_us']:.1f} us, graph {graph}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def write_json(args, res) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flashinfer_check.json").write_text(json.dumps(res, indent=1))


def print_table(res) -> None:
    v = res["versions"]
    sh = res["shape"]
    print(f"\nqmoe flashinfer_cutlass, flashinfer {v.get('flashinfer')} on {v.get('device')}, {sh['preset']} "
          f"(E={sh['E']}, top-{sh['top_k']}, H={sh['hidden_size']}, I={sh['intermediate_size']}, both padded "
          f"to multiples of 128), {res.get('reduced')} build")
    print(f"{'M':>6} {'experts':>7} {'rel err':>9} {'repeat':>9} {'graph us':>9} {'eager us':>9}")
    for r in res["rows"]:
        g = f"{r['graph_us']:.1f}" if r["graph_us"] is not None else "failed"
        print(f"{r['M']:>6} {r['active_experts']:>7} {r['rel_err']:>9.2e} {r['rel_err_repeat']:>9.2e} "
              f"{g:>9} {r['eager_us']:>9.1f}")


def cmd_auto(args) -> None:
    t0 = time.time()
    cmd_install(args)
    st = read_status(args)
    if st is None and not build_running(args):
        args.background = True
        cmd_build(args)
    if st is None:
        left = args.budget - (time.time() - t0) - CHECK_RESERVE_S
        st = wait_build(args, max(left, 0))
        if st is None:
            log(f"build still running (step {progress(args)}); run the same command again")
            return
    if not st.get("ok"):
        sys.exit(f"build failed: {json.dumps(st)[:3000]}")
    log(f"build: {st.get('level')} in {st.get('seconds', 0):.0f} s")
    if args.budget - (time.time() - t0) < CHECK_RESERVE_S:
        log("build finished, too little time left in this call for the check; run the same command again")
        return
    cmd_check(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["install", "build", "wait", "check", "auto"])
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of the wheels to install")
    ap.add_argument("--state", default="/tmp/qmoe_fi_check", help="installed wheels, build log and status")
    ap.add_argument("--reduced", default="aggressive", choices=["aggressive", "conservative", "none"])
    ap.add_argument("--background", action="store_true", help="build: start detached and return")
    ap.add_argument("--timeout", type=float, default=540, help="wait: seconds")
    ap.add_argument("--budget", type=float, default=540, help="auto: seconds this call may take")
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=list(MS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    {"install": cmd_install, "build": cmd_build, "wait": cmd_wait, "check": cmd_check, "auto": cmd_auto}[args.cmd](args)


if __name__ == "__main__":
    main()
