"""pack / unpack of scripts/device/flashinfer_build.py: the built FlashInfer module carried from
one GPU machine to the next. Runs on the CPU without FlashInfer: fake libraries, a fake cache
folder, and (for the command line) a fake `flashinfer` + `tvm_ffi` in the script's --state site."""

import argparse
import hashlib
import importlib.util
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device" / "flashinfer_build.py"


@pytest.fixture(scope="module")
def fc():
    spec = importlib.util.spec_from_file_location("qmoe_flashinfer_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_lib(path: Path, n: int, seed: int) -> Path:
    """n bytes, half random (incompressible), half a repeated pattern."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rnd = hashlib.shake_256(str(seed).encode()).digest(n // 2)
    path.write_bytes(rnd + (b"\x7fELF-ish" * n)[: n - n // 2])
    return path


def modules(tmp_path: Path) -> dict:
    jit = tmp_path / "cache" / "cached_ops"
    return {"fused_moe_90": fake_lib(jit / "fused_moe_90" / "fused_moe_90.so", 300_000, 1),
            "tiny": fake_lib(jit / "tiny" / "tiny.so", 5_000, 2)}


def test_round_trip_in_parts(fc, tmp_path):
    mods = modules(tmp_path)
    dest = tmp_path / "out"
    (dest).mkdir()
    (dest / (fc.ARCHIVE + ".part07")).write_bytes(b"stale")  # removed by the pack
    man = fc.pack_modules(mods, dest, {"flashinfer": "0.6.18.post1", "level": "aggressive", "build_seconds": 829.0},
                          tmp_path / "work", part_bytes=64 * 1024, preset=1, strip="no")
    parts = sorted(p.name for p in dest.glob(fc.ARCHIVE + ".part*"))
    assert parts == [p["name"] for p in man["parts"]] and len(parts) >= 3
    assert parts[0] == "fi_sm90_build.tar.xz.part00"
    assert all(p["bytes"] <= 64 * 1024 for p in man["parts"])
    assert json.loads((dest / fc.MANIFEST).read_text()) == man
    assert man["total_bytes"] == sum(p["bytes"] for p in man["parts"])
    assert {m["name"] for m in man["modules"]} == set(mods)
    assert not list((tmp_path / "work").iterdir())  # no temporary archive left behind

    aot = tmp_path / "site" / "flashinfer" / "data" / "aot"
    got = fc.unpack_modules(dest, aot, "0.6.18.post1")
    for name, src in mods.items():
        out = aot / name / f"{name}.so"
        assert out.read_bytes() == src.read_bytes()
        assert os.access(out, os.X_OK)
    assert sorted(os.listdir(aot / "fused_moe_90")) == ["fused_moe_90.so"]  # no temporary file left

    args = argparse.Namespace(state=str(tmp_path / "state"), reduced="conservative")
    st = fc.mark_prebuilt(args, got, dest, aot)
    assert fc.read_status(args) == st
    assert st["ok"] and st["level"] == "aggressive" and st["aot_dir"] == str(aot)
    assert sorted(st["modules"]) == sorted(mods)
    # the archive is plain xz + tar: the xz tool and tarfile read it
    blob = b"".join((dest / p).read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:xz") as tar:
        assert sorted(tar.getnames()) == ["fused_moe_90/fused_moe_90.so", "tiny/tiny.so"]


def test_refuses_too_many_parts(fc, tmp_path):
    mods = modules(tmp_path)
    dest = tmp_path / "out"
    with pytest.raises(fc.PrebuiltError, match=r"MiB \(\d+ bytes\): \d+ parts .* at most 2"):
        fc.pack_modules(mods, dest, {"flashinfer": "x"}, tmp_path / "work", part_bytes=32 * 1024, max_parts=2,
                        preset=1, strip="no")
    assert not dest.exists() or not list(dest.iterdir())


def test_refuses_missing_module(fc, tmp_path):
    with pytest.raises(fc.PrebuiltError, match="no built library"):
        fc.pack_modules({"fused_moe_90": tmp_path / "nope.so"}, tmp_path / "out", {}, tmp_path / "work")


def packed(fc, tmp_path):
    dest = tmp_path / "out"
    fc.pack_modules(modules(tmp_path), dest, {"flashinfer": "0.6.18.post1"}, tmp_path / "work",
                    part_bytes=64 * 1024, preset=1, strip="no")
    return dest


def test_unpack_checks_version_and_parts(fc, tmp_path):
    dest = packed(fc, tmp_path)
    aot = tmp_path / "aot"
    with pytest.raises(fc.PrebuiltError, match="packed under flashinfer 0.6.18.post1, but 0.7.2 is installed"):
        fc.unpack_modules(dest, aot, "0.7.2")
    assert not aot.exists()
    fc.unpack_modules(dest, aot, "0.7.2", force=True)
    assert (aot / "tiny" / "tiny.so").is_file()

    part = dest / (fc.ARCHIVE + ".part01")
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(fc.PrebuiltError, match="part01: sha256 differs"):
        fc.unpack_modules(dest, tmp_path / "aot2", "0.6.18.post1")
    part.unlink()
    with pytest.raises(fc.PrebuiltError, match="part01 is missing"):
        fc.unpack_modules(dest, tmp_path / "aot2", "0.6.18.post1")
    (dest / fc.MANIFEST).unlink()
    with pytest.raises(fc.PrebuiltError, match="no readable"):
        fc.unpack_modules(dest, tmp_path / "aot2", "0.6.18.post1")
    assert not (tmp_path / "aot2").exists()


def hand_made_pack(fc, folder: Path, members: dict, modules: list) -> None:
    """A pack whose tar holds `members` (name -> bytes) but whose manifest names `modules`."""
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    with lzma.LZMAFile(buf, "wb", format=lzma.FORMAT_XZ) as xzf, tarfile.open(fileobj=xzf, mode="w|") as tar:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    blob = buf.getvalue()
    (folder / (fc.ARCHIVE + ".part00")).write_bytes(blob)
    man = {"format": fc.PREBUILT_FORMAT, "flashinfer": "1.0",
           "modules": [{"name": n, "bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()} for n in modules],
           "total_bytes": len(blob), "uncompressed_bytes": 3,
           "parts": [{"name": fc.ARCHIVE + ".part00", "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}]}
    (folder / fc.MANIFEST).write_text(json.dumps(man))


@pytest.mark.parametrize("members, modules, match", [
    ({"m/../../evil.so": b"abc"}, ["m"], "unexpected archive member"),
    ({"other/other.so": b"abc"}, ["m"], "unexpected archive member"),
    ({"m/m.so": b"abd"}, ["m"], "content differs"),
    ({}, ["m"], r"missing from the archive: \['m'\]"),
])
def test_unpack_refuses_odd_archives(fc, tmp_path, members, modules, match):
    hand_made_pack(fc, tmp_path / "pack", members, modules)
    aot = tmp_path / "aot"
    with pytest.raises(fc.PrebuiltError, match=match):
        fc.unpack_modules(tmp_path / "pack", aot, "1.0")
    assert not (tmp_path / "evil.so").exists()
    assert not aot.exists() or not [p for p in aot.rglob("*") if p.is_file()]


def test_strip_auto_only_over_budget(fc, tmp_path):
    mods = modules(tmp_path)
    man = fc.pack_modules(mods, tmp_path / "a", {}, tmp_path / "w", preset=1, strip="auto")
    assert not any(m["stripped"] for m in man["modules"])
    # over budget: strip is tried; on these non-ELF files it fails and the pack goes on unstripped
    man = fc.pack_modules(mods, tmp_path / "b", {}, tmp_path / "w", preset=1, strip="auto", budget=1)
    assert not any(m["stripped"] for m in man["modules"])
    assert (tmp_path / "b" / fc.MANIFEST).is_file()


def test_prebuilt_source(fc, tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "DEFAULT_PREBUILT", tmp_path / ".fi_build")
    ns = dict(prebuilt=None, no_prebuilt=False)
    assert fc.prebuilt_source(argparse.Namespace(**ns)) == (None, False)
    (tmp_path / ".fi_build").mkdir()
    (tmp_path / ".fi_build" / fc.MANIFEST).write_text("{}")
    assert fc.prebuilt_source(argparse.Namespace(**ns)) == (tmp_path / ".fi_build", False)
    assert fc.prebuilt_source(argparse.Namespace(**{**ns, "prebuilt": "x"})) == (Path("x"), True)
    assert fc.prebuilt_source(argparse.Namespace(**{**ns, "no_prebuilt": True})) == (None, False)


FAKE_ENV = '''
import os, pathlib
_root = pathlib.Path(__file__).resolve().parents[1]
FLASHINFER_WORKSPACE_DIR = pathlib.Path(os.environ["FAKE_FI_CACHE"]) / "0.6.18.post1" / "90a"
FLASHINFER_JIT_DIR = FLASHINFER_WORKSPACE_DIR / "cached_ops"
FLASHINFER_AOT_DIR = _root / "data" / "aot"
'''
FAKE_TVM = '''
def load_module(path):
    if open(path, "rb").read(4) == b"BAD!":
        raise OSError("cannot dlopen " + path)
    return path
'''


def run_script(*args, state, cache):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "FLASHINFER_DISABLE_JIT")}
    env["FAKE_FI_CACHE"] = str(cache)
    r = subprocess.run([sys.executable, str(SCRIPT), *args, "--state", str(state)], capture_output=True, text=True,
                       env=env, timeout=120)
    return r.returncode, r.stdout + r.stderr


def fake_site(state: Path) -> None:
    site = state / "site"
    (site / "flashinfer" / "jit").mkdir(parents=True)
    (site / "flashinfer" / "__init__.py").write_text('__version__ = "0.6.18.post1"\n')
    (site / "flashinfer" / "jit" / "__init__.py").write_text("")
    (site / "flashinfer" / "jit" / "env.py").write_text(FAKE_ENV)
    (site / "tvm_ffi").mkdir()
    (site / "tvm_ffi" / "__init__.py").write_text('__version__ = "0.1.15.post2"\n' + FAKE_TVM)


def test_command_line_pack_then_unpack_on_a_fresh_state(tmp_path):
    cache, state, out = tmp_path / "cache", tmp_path / "state1", tmp_path / "out"
    fake_site(state)
    so = fake_lib(cache / "0.6.18.post1" / "90a" / "cached_ops" / "fused_moe_90" / "fused_moe_90.so", 200_000, 3)
    rc, text = run_script("pack", "--dest", str(out), state=state, cache=cache)
    assert rc != 0 and "no finished build recorded" in text
    (state / "build.json").write_text(json.dumps({"ok": True, "level": "aggressive", "seconds": 829.0}))
    rc, text = run_script("pack", "--dest", str(out), "--xz-preset", "1", state=state, cache=cache)
    assert rc == 0, text
    assert "packed 1 part(s)" in text and "fi_sm90_build.tar.xz.part00" in text
    man = json.loads((out / "fi_sm90_build.json").read_text())
    assert man["flashinfer"] == "0.6.18.post1" and man["level"] == "aggressive" and man["build_seconds"] == 829.0
    assert man["tvm_ffi"] == "0.1.15.post2" and [m["name"] for m in man["modules"]] == ["fused_moe_90"]

    fresh = tmp_path / "state2"  # the next machine: wheels installed, nothing built, no cache
    fake_site(fresh)
    rc, text = run_script("unpack", "--src", str(out), state=fresh, cache=tmp_path / "cache2")
    assert rc == 0, text
    aot_so = fresh / "site" / "flashinfer" / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so"
    assert aot_so.read_bytes() == so.read_bytes()
    st = json.loads((fresh / "build.json").read_text())
    assert st["ok"] and st["prebuilt"] == str(out) and st["level"] == "aggressive"
    assert st["aot_dir"] == str(aot_so.parents[1])

    # a library that does not load is removed again and nothing is recorded
    bad = tmp_path / "state3"
    fake_site(bad)
    so.write_bytes(b"BAD!" + so.read_bytes()[4:])
    rc, text = run_script("pack", "--dest", str(tmp_path / "out2"), "--xz-preset", "1", "--force", state=bad,
                          cache=cache)
    assert rc == 0, text
    rc, text = run_script("unpack", "--src", str(tmp_path / "out2"), state=bad, cache=cache)
    assert rc != 0 and "does not load" in text
    assert not (bad / "site" / "flashinfer" / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so").exists()
    assert not (bad / "build.json").exists()
