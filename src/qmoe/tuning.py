"""The tuning table: how fast each backend ran each MoE shape on this GPU, per token count.

Written by `qmoe tune`, read by `backend="auto"` (qmoe.dispatch). One JSON file:

    {"schema": 1,
     "entries": {"<key>": {"gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
                           "versions": {"torch": "2.11.0", "triton": "3.6.0", "flashinfer": null, "qmoe": "0.1.0"},
                           "format": "mxfp4",
                           "shape": {"num_experts": 128, "hidden_size": 2880, "intermediate_size": 2880, "top_k": 4},
                           "measured_at": "2026-11-22T14:00:00Z",
                           "times_us": {"triton": {"1": 58.2, "4": 135.0, ...}, ...},
                           "methods": {"triton": "cuda_graph", ...},
                           "layout_bytes": {"triton": 1703411712, "reference": 0},
                           "excluded": {"flashinfer_trtllm": "needs SM100; this GPU is SM90"},
                           "errors": {"reference": {"8192": "OutOfMemoryError: ..."}}}}}

The key joins GPU name, capability, library versions, format and shape, so environments that
share one cache file (two virtualenvs, say) keep their own measurements. An entry for this GPU,
format and shape measured under other versions is ignored with a warning: an upgrade can change
any kernel's speed, so old numbers must not choose a backend.

Where: `path` argument > $QMOE_TUNING_FILE > $XDG_CACHE_HOME/qmoe/tuning.json > ~/.cache/qmoe/tuning.json.

Concurrency: readers never lock; a writer takes an exclusive lock on "<file>.lock" (fcntl.flock),
re-reads the file, merges its entries in (a same key is replaced), writes a temporary file in the
same folder, fsyncs it and renames it over the table (os.replace is atomic), so a reader sees the
old table or the new one, never half of one, and concurrent writers do not lose each other's
entries.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SCHEMA = 1
ENV_VAR = "QMOE_TUNING_FILE"
"""Environment variable naming the tuning table file (overrides the cache-dir default)."""


def default_path() -> Path:
    """$QMOE_TUNING_FILE, else $XDG_CACHE_HOME/qmoe/tuning.json, else ~/.cache/qmoe/tuning.json."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "qmoe" / "tuning.json"


@functools.lru_cache(maxsize=None)
def library_versions() -> dict:
    """{"torch", "triton", "flashinfer", "qmoe"} -> version string or None when not installed.

    Read from package metadata, so flashinfer is never imported just to learn its version.
    """
    def dist(*names):
        for n in names:
            try:
                return importlib.metadata.version(n)
            except importlib.metadata.PackageNotFoundError:
                pass
        return None

    qmoe_mod = sys.modules.get("qmoe")
    return {"torch": torch.__version__, "triton": dist("triton", "pytorch-triton"),
            "flashinfer": dist("flashinfer-python", "flashinfer"),
            "qmoe": getattr(qmoe_mod, "__version__", None) or dist("qmoe")}


def environment(device) -> dict:
    """{"gpu": name ("cpu" for the CPU), "capability": [major, minor] or None, "versions": {...}}."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        cap = list(torch.cuda.get_device_capability(index))
    else:
        name, cap = device.type, None
    return {"gpu": name, "capability": cap, "versions": dict(library_versions())}


def shape_of(spec) -> dict:
    """The part of a MoESpec the table is keyed by."""
    return {"num_experts": spec.num_experts, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "top_k": spec.top_k}


def _problem_key(env: dict, fmt: str, shape: dict) -> str:
    cap = "sm" + "".join(str(c) for c in env["capability"]) if env["capability"] else "nocap"
    s = shape
    return (f"{env['gpu']}|{cap}|{fmt}|E{s['num_experts']} H{s['hidden_size']} "
            f"I{s['intermediate_size']} k{s['top_k']}")


def entry_key(env: dict, fmt: str, shape: dict) -> str:
    """"<gpu>|sm90|mxfp4|E128 H2880 I2880 k4|torch 2.11.0 triton 3.6.0 flashinfer - qmoe 0.1.0"."""
    versions = " ".join(f"{k} {v or '-'}" for k, v in sorted(env["versions"].items()))
    return f"{_problem_key(env, fmt, shape)}|{versions}"


def make_entry(env: dict, fmt: str, spec, times_us: dict, *, methods: dict | None = None,
               layout_bytes: dict | None = None, excluded: dict | None = None,
               errors: dict | None = None) -> tuple[str, dict]:
    """(key, entry) for one (GPU, versions, format, shape) measurement.

    times_us: backend -> {M: microseconds}; methods: backend -> how it was timed;
    layout_bytes: backend -> bytes of its prepared layout; excluded: backend -> why not measured;
    errors: backend -> {M: error text} for calls that failed.
    """
    shape = shape_of(spec)
    entry = {
        "gpu": env["gpu"], "capability": env["capability"], "versions": env["versions"],
        "format": fmt, "shape": shape,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "times_us": {b: {str(int(m)): float(t) for m, t in d.items()} for b, d in times_us.items()},
        "methods": dict(methods or {}), "layout_bytes": {b: int(n) for b, n in (layout_bytes or {}).items()},
        "excluded": dict(excluded or {}),
        "errors": {b: {str(m): str(t) for m, t in d.items()} for b, d in (errors or {}).items()},
    }
    return entry_key(env, fmt, shape), entry


def _empty() -> dict:
    return {"schema": SCHEMA, "entries": {}}


def read_table(path=None) -> dict:
    """The table at `path` (default: `default_path()`); an empty table when the file is missing.

    A file that is not a qmoe tuning table of this schema is ignored with a warning.
    """
    path = Path(path) if path is not None else default_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _empty()
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        warnings.warn(f"qmoe tuning table {path} is not valid JSON ({e}); ignoring it", stacklevel=2)
        return _empty()
    if not isinstance(table, dict) or table.get("schema") != SCHEMA or not isinstance(table.get("entries"), dict):
        got = table.get("schema") if isinstance(table, dict) else type(table).__name__
        warnings.warn(f"qmoe tuning table {path} has schema {got!r}, this qmoe reads schema {SCHEMA}; "
                      f"ignoring it (run `qmoe tune` to rewrite it)", stacklevel=2)
        return _empty()
    return table


def write_entries(entries: dict, path=None) -> Path:
    """Merge `entries` (key -> entry, from `make_entry`) into the table at `path`, atomically.

    Takes the "<path>.lock" lock, re-reads the table, replaces same keys, writes a temporary
    file in the same folder, fsyncs it and renames it over the table. Returns the path.
    """
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a broken old table is simply replaced
            table = read_table(path)
        table["entries"].update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
    return path


class _locked:
    """An exclusive advisory lock on a lock file (kept, never deleted: deleting it races)."""

    def __init__(self, lock_path: Path):
        self.lock_path = lock_path

    def __enter__(self):
        self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no flock (Windows): writes stay atomic, concurrent merges may lose one
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the flock


def _fsync_dir(folder: Path):
    # make the rename itself durable; not every platform lets a folder be opened
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def lookup(spec, fmt: str, device, table=None) -> tuple[str, dict] | None:
    """The (key, entry) measured for this GPU, these library versions, format and shape, or None.

    table: a table dict (from `read_table`), a path, or None for `default_path()`.
    Entries for this GPU, format and shape measured under other library versions are
    ignored with a warning saying which versions differ.
    """
    if table is None or isinstance(table, (str, os.PathLike)):
        table = read_table(table)
    env = environment(device)
    shape = shape_of(spec)
    key = entry_key(env, fmt, shape)
    entries = table.get("entries", {})
    if key in entries:
        return key, entries[key]
    problem = _problem_key(env, fmt, shape)
    for other_key, entry in entries.items():
        if other_key.startswith(problem + "|"):
            theirs = entry.get("versions", {})
            diff = ", ".join(f"{k} {theirs.get(k) or '-'} (now {v or '-'})"
                             for k, v in sorted(env["versions"].items()) if theirs.get(k) != v)
            warnings.warn(f"qmoe tuning: ignoring the entry for {problem} measured with {diff}; "
                          f"run `qmoe tune` to measure this installation", stacklevel=2)
    return None


__all__ = ["ENV_VAR", "SCHEMA", "default_path", "entry_key", "environment", "library_versions", "lookup",
           "make_entry", "read_table", "shape_of", "write_entries"]
