#!/usr/bin/env python3
"""Installing and carrying FlashInfer's SM90 MoE build on a lent GPU machine: what `qmoe`
cannot do itself. Checking and timing the flashinfer_cutlass backend is `qmoe check` and
`qmoe bench`.

On the GPU machine, from the repository root, carrying the git-ignored .whl/ folder
(flashinfer-python and apache-tvm-ffi wheels, see docs/flashinfer.md):

    python3 scripts/device/flashinfer_build.py auto --wheels .whl --budget 540

FlashInfer JIT-compiles its SM90 MoE module with nvcc at first use; even the reduced
build (bf16 x MXFP4 kernels only, below) takes longer than one 10-minute command. `auto`
is idempotent: it installs the wheels (once), starts the build in the background (once) or
unpacks a carried one, and waits for it until the budget is spent. Repeat the same command on
the same (still warm) machine until it says the module is ready.

Sub-commands: install, build [--background], wait, auto, pack, unpack. State (installed wheels,
build log and status) lives in --state (default /tmp/qmoe_fi_check).

The machine is lent bare each time, so the build can be brought back and taken along:
`pack` (after a finished build) writes the built module as an xz tar in parts of at most
15 MiB plus a manifest to $OUT; copied into the repository's git-ignored .fi_build/ and
carried next time, `auto --prebuilt .fi_build` (or plain `auto`, which looks there) unpacks
it into FlashInfer's AOT folder, which FlashInfer loads without ninja or nvcc (see
`unpack_modules`). docs/flashinfer.md has the round trip.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

CHECK_RESERVE_S = 30  # what `auto` keeps for itself after waiting on the build
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


# --- the prebuilt module: pack on one machine, unpack on the next -----------------------------
# How FlashInfer 0.6.18.post1 decides whether to build (flashinfer/jit/core.py): every
# `get_*_module()` calls `JitSpec.build_and_load()`, which first calls `JitSpecNvcc.try_load()`.
# That returns a module only for the AOT artifact, `FLASHINFER_AOT_DIR/<name>/<name>.so`
# (`aot_path`, `is_aot`: the file exists; flashinfer/jit/env.py sets FLASHINFER_AOT_DIR to
# `<package>/data/aot`, or to the flashinfer-jit-cache package's folder when that is installed).
# The JIT copy, `~/.cache/flashinfer/<version>/<arch>/cached_ops/<name>/<name>.so` (under
# $FLASHINFER_WORKSPACE_BASE instead of ~ when set), is never loaded directly: `build()` always
# rewrites build.ninja (only when its text changed) and runs ninja, which decides from the
# objects, the mtimes of sources and headers (.ninja_deps) and the command hashes (.ninja_log).
# Carrying that would mean carrying every object file and making a fresh pip install's source
# mtimes older than them. So the .so alone is packed, and unpacked as the AOT artifact (what
# FlashInfer's own AOT packaging does: flashinfer/aot.py `copy_built_kernels` copies
# cached_ops/<name>/<name>.so to <out>/<name>/<name>.so): loaded by tvm_ffi.load_module without
# ninja, without nvcc, whatever the source list (the reduced build filter no longer matters).
PREBUILT_FORMAT = "qmoe-flashinfer-prebuilt-1"
ARCHIVE = "fi_sm90_build.tar.xz"
MANIFEST = "fi_sm90_build.json"
PART_BYTES = 15 * 2**20  # a returned file may have 16 MiB
MAX_PARTS = 6  # 8 files come back from a command: the parts, the manifest, flashinfer_check.json
CARRY_BUDGET = 40 * 2**20  # carried paths + working tree <= 64 MiB, and .whl/ takes 21 MB
MODULE = "fused_moe_90"
DEFAULT_PREBUILT = REPO / ".fi_build"
NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class PrebuiltError(Exception):
    """A prebuilt archive that cannot be made or used (the message says why)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def strip_copy(src: Path, dst: Path) -> bool:
    """`strip --strip-unneeded` src into dst (host symbol table only: .dynsym, which dlopen and
    tvm_ffi use, and the CUDA fatbin stay); False where there is no strip or it failed."""
    tool = shutil.which("strip")
    if tool is None:
        return False
    r = subprocess.run([tool, "--strip-unneeded", "-o", str(dst), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        log(f"strip failed on {src.name} ({r.stderr.strip()[:300]}); packing it unstripped")
        dst.unlink(missing_ok=True)
        return False
    return True


def write_archive(modules: dict[str, Path], archive: Path, work: Path, preset: int, strip: bool) -> list[dict]:
    """The modules as `<name>/<name>.so` in an xz tar (x86 BCJ + LZMA2, what `xz -d` and
    Python's tarfile read); returns what the manifest records per module."""
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": preset}]
    infos = []
    with lzma.LZMAFile(archive, "wb", format=lzma.FORMAT_XZ, filters=filters) as xzf, \
            tarfile.open(fileobj=xzf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(modules.items()):
            src, stripped = Path(path), False
            if strip:
                tmp = work / f"{name}.stripped.so"
                stripped = strip_copy(src, tmp)
                src = tmp if stripped else src
            ti = tarfile.TarInfo(f"{name}/{name}.so")
            ti.size, ti.mode, ti.mtime = src.stat().st_size, 0o755, int(time.time())
            with open(src, "rb") as f:
                tar.addfile(ti, f)
            infos.append({"name": name, "bytes": ti.size, "sha256": sha256_file(src), "stripped": stripped,
                          "source": str(path), "source_bytes": Path(path).stat().st_size})
            if stripped:
                src.unlink()
    return infos


def pack_modules(modules: dict[str, Path], dest: Path, meta: dict, work: Path, *, part_bytes: int = PART_BYTES,
                 max_parts: int = MAX_PARTS, preset: int = 9, strip: str = "auto",
                 budget: int = CARRY_BUDGET) -> dict:
    """Compress `modules` (name -> built .so) into dest/ARCHIVE.partNN (each <= part_bytes) and
    dest/MANIFEST; refuses (PrebuiltError, nothing written to dest) beyond max_parts.
    strip: "no", "yes", or "auto" (strip only when the unstripped archive exceeds `budget`)."""
    for name, path in modules.items():
        if not NAME_OK.match(name) or not Path(path).is_file():
            raise PrebuiltError(f"module {name!r}: no built library at {path}")
    if not modules:
        raise PrebuiltError("no built module to pack")
    work.mkdir(parents=True, exist_ok=True)
    archive = work / ARCHIVE
    t0 = time.time()
    infos = write_archive(modules, archive, work, preset, strip == "yes")
    total = archive.stat().st_size
    if strip == "auto" and total > budget and shutil.which("strip"):
        log(f"archive {mib(total)} > {mib(budget)}: packing again with stripped libraries")
        infos = write_archive(modules, archive, work, preset, True)
        total = archive.stat().st_size
    raw = sum(i["bytes"] for i in infos)
    sizes = ", ".join(f"{i['name']} {mib(i['bytes'])}" + (" stripped" if i["stripped"] else "") for i in infos)
    log(f"compressed {mib(raw)} of libraries ({sizes}) to {mib(total)} in {time.time() - t0:.0f} s")
    n_parts = max(1, -(-total // part_bytes))
    if n_parts > max_parts:
        archive.unlink()
        raise PrebuiltError(f"the archive is {mib(total)} ({total} bytes): {n_parts} parts of {mib(part_bytes)} "
                            f"would be needed, at most {max_parts} allowed; nothing written")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(ARCHIVE + ".part*"):
        old.unlink()
    parts = []
    with open(archive, "rb") as f:
        for i in range(n_parts):
            data = f.read(part_bytes)
            part = dest / f"{ARCHIVE}.part{i:02d}"
            part.write_bytes(data)
            parts.append({"name": part.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    archive.unlink()
    manifest = {"format": PREBUILT_FORMAT, "archive": ARCHIVE, **meta, "modules": infos,
                "uncompressed_bytes": raw, "total_bytes": total, "parts": parts,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in parts:
        log(f"  {dest / p['name']}  {p['bytes']:>9} bytes ({mib(p['bytes'])})  sha256 {p['sha256'][:16]}...")
    log(f"  {dest / MANIFEST}")
    log(f"packed {len(parts)} part(s), {mib(total)} in all")
    if total > budget:
        log(f"WARNING: {mib(total)} is more than the {mib(budget)} that can be carried next to .whl/ "
            f"(64 MiB for the working tree and the carried paths together)")
    return manifest


def read_manifest(src: Path) -> dict:
    try:
        manifest = json.loads((Path(src) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise PrebuiltError(f"no readable {MANIFEST} in {src}: {e}") from e
    if manifest.get("format") != PREBUILT_FORMAT:
        raise PrebuiltError(f"{src / MANIFEST}: format {manifest.get('format')!r}, expected {PREBUILT_FORMAT!r}")
    return manifest


def verify_parts(src: Path, manifest: dict) -> list[Path]:
    """The part files in order, each checked for size and sha256 against the manifest."""
    paths = []
    for p in manifest["parts"]:
        if not NAME_OK.match(p["name"]):
            raise PrebuiltError(f"odd part name {p['name']!r} in the manifest")
        path = Path(src) / p["name"]
        if not path.is_file():
            raise PrebuiltError(f"part {path} is missing")
        if path.stat().st_size != p["bytes"]:
            raise PrebuiltError(f"part {path}: {path.stat().st_size} bytes, the manifest says {p['bytes']}")
        if sha256_file(path) != p["sha256"]:
            raise PrebuiltError(f"part {path}: sha256 differs from the manifest (damaged or from another pack)")
        paths.append(path)
    if sum(p["bytes"] for p in manifest["parts"]) != manifest["total_bytes"]:
        raise PrebuiltError("the parts do not add up to the manifest's total_bytes")
    return paths


class PartsReader(io.RawIOBase):
    """The concatenation of the part files, read in order."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self.paths, self.f = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self.f is None:
                if not self.paths:
                    return 0
                self.f = open(self.paths.pop(0), "rb")
            n = self.f.readinto(buf)
            if n:
                return n
            self.f.close()
            self.f = None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        super().close()


def unpack_modules(src: Path, aot_dir: Path, installed_version: str | None, *, force: bool = False) -> dict:
    """Check the manifest, the parts and the FlashInfer version, then write each module to
    aot_dir/<name>/<name>.so (written beside it and renamed, so no half-written file is ever
    there: FlashInfer's `is_aot` only asks whether the file exists). Returns the manifest."""
    src, aot_dir = Path(src), Path(aot_dir)
    manifest = read_manifest(src)
    if installed_version != manifest.get("flashinfer") and not force:
        raise PrebuiltError(f"packed under flashinfer {manifest.get('flashinfer')}, but {installed_version} is "
                            f"installed: a module must be loaded by the FlashInfer that built it (--force to try)")
    paths = verify_parts(src, manifest)
    want = {m["name"]: m for m in manifest["modules"]}
    for name in want:
        if not NAME_OK.match(name):
            raise PrebuiltError(f"odd module name {name!r} in the manifest")
    done, staged = set(), []
    try:
        with io.BufferedReader(PartsReader(paths), 1 << 20) as raw, tarfile.open(fileobj=raw, mode="r|xz") as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = member.name.split("/")[0]
                if not member.isfile() or member.name != f"{name}/{name}.so" or name not in want or name in done:
                    raise PrebuiltError(f"unexpected archive member {member.name!r}")
                target = aot_dir / name / f"{name}.so"
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{name}.so.{os.getpid()}.tmp")
                staged.append(tmp)
                h = hashlib.sha256()
                with tar.extractfile(member) as f, open(tmp, "wb") as out:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
                if h.hexdigest() != want[name]["sha256"] or tmp.stat().st_size != want[name]["bytes"]:
                    raise PrebuiltError(f"{member.name}: content differs from the manifest")
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
                done.add(name)
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise PrebuiltError(f"the archive in {src} cannot be read: {e!r}") from e
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    if done != set(want):
        raise PrebuiltError(f"modules missing from the archive: {sorted(set(want) - done)}")
    return manifest


def mark_prebuilt(args, manifest: dict, src: Path, aot_dir: Path) -> dict:
    """Record the unpacked module as this machine's finished build, so `check` and `auto` go on."""
    st = {"ok": True, "level": manifest.get("level") or args.reduced, "seconds": 0.0, "prebuilt": str(src),
          "aot_dir": str(aot_dir), "modules": [m["name"] for m in manifest["modules"]],
          "flashinfer": manifest.get("flashinfer"), "built_in_s": manifest.get("build_seconds"),
          "packed": manifest.get("created")}
    Path(args.state).mkdir(parents=True, exist_ok=True)
    status_file(args).write_text(json.dumps(st))
    return st


def fi_env():
    """FlashInfer's jit env module, imported as the build imported it (same arch list)."""
    os.environ.update(build_env())
    import flashinfer.jit.env as jit_env
    return jit_env


def fi_meta(args, jit_env) -> dict:
    import flashinfer

    st = read_status(args) or {}
    meta = {"flashinfer": flashinfer.__version__, "arch_list": os.environ.get("FLASHINFER_CUDA_ARCH_LIST"),
            "workspace": str(jit_env.FLASHINFER_WORKSPACE_DIR), "level": st.get("level"),
            "build_seconds": st.get("seconds"), "python": sys.version.split()[0]}
    for mod in ("tvm_ffi", "torch"):
        try:
            meta[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001 - recorded only
            pass
    try:
        meta["nvcc"] = subprocess.check_output(["nvcc", "--version"], text=True).strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError):
        pass
    return meta


def cmd_pack(args) -> None:
    if build_running(args):
        sys.exit(f"pack: the build is still running (step {progress(args)}); pack after it finished")
    st = read_status(args)
    if not (st and st.get("ok")) and not args.force:
        sys.exit(f"pack: no finished build recorded in {status_file(args)} (build first, or --force)")
    dest = args.dest or os.environ.get("OUT")
    if not dest:
        sys.exit("pack: no --dest and $OUT is not set")
    use_site(args)
    jit_env = fi_env()
    names = [n for n in args.modules.split(",") if n] if args.modules else None
    found = {}
    # an AOT copy (unpacked here) is what FlashInfer loads first, so it wins over a JIT build
    for base in (jit_env.FLASHINFER_AOT_DIR, jit_env.FLASHINFER_JIT_DIR):
        if Path(base).is_dir():
            for d in sorted(Path(base).iterdir()):
                so = d / f"{d.name}.so"
                if so.is_file() and (names is None or d.name in names):
                    found.setdefault(d.name, so)
    if MODULE not in found and (names is None or MODULE in names):
        sys.exit(f"pack: no {MODULE}.so under {jit_env.FLASHINFER_JIT_DIR} or {jit_env.FLASHINFER_AOT_DIR}")
    if names is not None and set(names) - set(found):
        sys.exit(f"pack: not built: {sorted(set(names) - set(found))}")
    try:
        pack_modules(found, Path(dest), fi_meta(args, jit_env), Path(args.state) / "pack", max_parts=args.max_parts,
                     preset=args.xz_preset, strip=args.strip)
    except PrebuiltError as e:
        sys.exit(f"pack: {e}")


def unpack_here(args, src: Path) -> dict:
    """Unpack src into the installed FlashInfer's AOT folder (or --aot-dir), load-test it and
    record it as the build; raises PrebuiltError."""
    use_site(args)
    jit_env = fi_env()
    import flashinfer

    aot_dir = Path(args.aot_dir) if args.aot_dir else Path(jit_env.FLASHINFER_AOT_DIR)
    t0 = time.time()
    manifest = unpack_modules(src, aot_dir, flashinfer.__version__, force=args.force)
    for mod in ("tvm_ffi",):
        have = None
        try:
            have = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
        if manifest.get(mod) and have != manifest[mod]:
            log(f"WARNING: packed with {mod} {manifest[mod]}, {have} installed")
    names = [m["name"] for m in manifest["modules"]]
    if not args.no_load_test:
        import tvm_ffi

        for name in names:
            so = aot_dir / name / f"{name}.so"
            try:
                tvm_ffi.load_module(str(so))
            except Exception as e:
                for n in names:  # leave nothing FlashInfer would try (and fail) to load
                    (aot_dir / n / f"{n}.so").unlink(missing_ok=True)
                raise PrebuiltError(f"{so} does not load: {e!r}"[:2000]) from e
    st = mark_prebuilt(args, manifest, src, aot_dir)
    log(f"unpacked {', '.join(names)} ({mib(manifest['uncompressed_bytes'])}, flashinfer {manifest['flashinfer']}, "
        f"{manifest.get('level')} build packed {manifest.get('created')}) into {aot_dir} in {time.time() - t0:.0f} s")
    return st


def cmd_unpack(args) -> None:
    try:
        unpack_here(args, Path(args.src))
    except PrebuiltError as e:
        sys.exit(f"unpack: {e}")


def prebuilt_source(args) -> tuple[Path | None, bool]:
    """The folder `auto` unpacks from and whether it was asked for explicitly."""
    if args.no_prebuilt:
        return None, False
    if args.prebuilt:
        return Path(args.prebuilt), True
    return (DEFAULT_PREBUILT, False) if (DEFAULT_PREBUILT / MANIFEST).is_file() else (None, False)


def cmd_auto(args) -> None:
    t0 = time.time()
    cmd_install(args)
    st = read_status(args)
    if st is None and not build_running(args):
        src, explicit = prebuilt_source(args)
        if src is not None:
            try:
                st = unpack_here(args, src)
            except PrebuiltError as e:
                if explicit:
                    sys.exit(f"unpack: {e}")
                log(f"not using {src}: {e}; building instead")
        if st is None:
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
    if st.get("prebuilt"):
        log(f"build: prebuilt {st.get('level')} module from {st['prebuilt']} "
            f"(built in {st.get('built_in_s') or 0:.0f} s, packed {st.get('packed')})")
    else:
        log(f"build: {st.get('level')} in {st.get('seconds', 0):.0f} s")
    log("FlashInfer's SM90 MoE module is ready: qualify and time it with qmoe itself, e.g. "
        "`FLASHINFER_DISABLE_JIT=1 python3 -m qmoe check --backend flashinfer_cutlass` and "
        "`python3 -m qmoe bench --backend flashinfer_cutlass --backend triton`")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["install", "build", "wait", "auto", "pack", "unpack"])
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of the wheels to install")
    ap.add_argument("--state", default="/tmp/qmoe_fi_check", help="installed wheels, build log and status")
    ap.add_argument("--reduced", default="aggressive", choices=["aggressive", "conservative", "none"])
    ap.add_argument("--background", action="store_true", help="build: start detached and return")
    ap.add_argument("--timeout", type=float, default=540, help="wait: seconds")
    ap.add_argument("--budget", type=float, default=540, help="auto: seconds this call may take")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dest", help="pack: folder for the parts and the manifest (default $OUT)")
    ap.add_argument("--src", default=str(DEFAULT_PREBUILT), help="unpack: folder of the parts and the manifest")
    ap.add_argument("--prebuilt", help=f"auto: unpack this pack instead of building (default {DEFAULT_PREBUILT.name}/ "
                    "when it holds a manifest)")
    ap.add_argument("--no-prebuilt", action="store_true", help="auto: build even if a pack is there")
    ap.add_argument("--modules", help=f"pack: comma-separated module names (default every built one; {MODULE} needed)")
    ap.add_argument("--strip", default="auto", choices=["auto", "yes", "no"],
                    help="pack: strip host symbols (auto: only if the archive would exceed the carry budget)")
    ap.add_argument("--xz-preset", type=int, default=9, choices=range(10), metavar="0-9", help="pack: xz level")
    ap.add_argument("--max-parts", type=int, default=MAX_PARTS, help="pack: refuse beyond this many parts")
    ap.add_argument("--force", action="store_true",
                    help="pack: without a finished build status; unpack: despite another FlashInfer version")
    ap.add_argument("--aot-dir", help="unpack: where to put the modules (default FlashInfer's FLASHINFER_AOT_DIR)")
    ap.add_argument("--no-load-test", action="store_true", help="unpack: do not dlopen the unpacked modules")
    args = ap.parse_args()
    {"install": cmd_install, "build": cmd_build, "wait": cmd_wait, "auto": cmd_auto,
     "pack": cmd_pack, "unpack": cmd_unpack}[args.cmd](args)


if __name__ == "__main__":
    main()
