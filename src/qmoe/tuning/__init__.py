"""What was measured on this GPU: the tuning table behind backend="auto", the library versions
that key every measurement, and the one M-bucket rule (`buckets`) and table store (`store`).

The tuning table is written by `qmoe tune` and read by `backend="auto"` (qmoe.dispatch):

    {"schema": 2, "kind": "qmoe-tuning",
     "entries": {"<key>": {"gpu": "NVIDIA H200", "capability": [9, 0],
                           "versions": {"torch": "2.11.0", "triton": "3.6.0", ...},
                           "format": "mxfp4",
                           "shape": {"num_experts": 128, "hidden_size": 2880, "intermediate_size": 2880, "top_k": 4},
                           "measured_at": "2026-12-01T14:00:00Z",
                           "times_us": {"triton": {"1": 58.2, "4": 135.0, ...}, ...},
                           "methods": {"triton": "cuda_graph, L2 flushed", ...},
                           "layout_bytes": {"triton": 1703411712, "reference": 0},
                           "excluded": {"flashinfer_trtllm": "needs SM100; this GPU is SM90"},
                           "errors": {"reference": {"8192": "OutOfMemoryError: ..."}}}}}

The key joins GPU name, capability, format, shape and library versions (qmoe.tuning.store); an
entry for this GPU, format and shape measured under other versions is ignored with a warning: an
upgrade can change any kernel's speed, so old numbers must not choose a backend. A later
`qmoe tune` of some backends or token counts MERGES into the entry (`merge_entry`): the other
backends' and token counts' times stay.

Where: `path` argument > $QMOE_TUNING_FILE > $XDG_CACHE_HOME/qmoe/tuning.json > ~/.cache/qmoe/tuning.json.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import math
import sys
import warnings

import torch

from .store import TableStore, entry_key, stale

ENV_VAR = "QMOE_TUNING_FILE"
"""Environment variable naming the tuning table file (overrides the cache-folder default)."""

_LIBRARIES = {"torch": ("torch",), "triton": ("triton", "pytorch-triton"),
              "flashinfer": ("flashinfer-python", "flashinfer"), "humming": ("humming-kernels",),
              "vllm": ("vllm",), "qmoe": ("qmoe",)}


@functools.lru_cache(maxsize=None)
def library_versions() -> dict:
    """{"torch", "triton", "flashinfer", "humming", "vllm", "qmoe"} -> version string, or None
    when not installed. Read from package metadata (never importing the libraries)."""
    def dist(names):
        for n in names:
            try:
                return importlib.metadata.version(n)
            except importlib.metadata.PackageNotFoundError:
                pass
        return None

    out = {lib: dist(names) for lib, names in _LIBRARIES.items()}
    out["torch"] = torch.__version__
    qmoe_mod = sys.modules.get("qmoe")
    out["qmoe"] = getattr(qmoe_mod, "__version__", None) or out["qmoe"]
    return out


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
    """The part of a MoESpec the tables are keyed by."""
    return {"num_experts": spec.num_experts, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "top_k": spec.top_k}


def problem_key(env: dict, fmt: str, shape: dict) -> str:
    """"<gpu>|sm90|mxfp4|E128 H2880 I2880 k4": what a measurement is of, versions aside."""
    cap = "sm" + "".join(str(c) for c in env["capability"]) if env["capability"] else "nocap"
    s = shape
    return (f"{env['gpu']}|{cap}|{fmt}|E{s['num_experts']} H{s['hidden_size']} "
            f"I{s['intermediate_size']} k{s['top_k']}")


def _times(d) -> dict:
    """{M: us} from a JSON {str: number} map; ValueError/TypeError for anything else."""
    out = {}
    for m, t in d.items():
        m, t = int(m), float(t)
        if m < 1 or not math.isfinite(t) or t <= 0:
            raise ValueError(f"M={m}: {t} us is not a usable time")
        out[m] = t
    return out


def validate_entry(entry) -> str | None:
    """None if a tuning entry can be used, else why not."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    for name in ("times_us", "versions"):
        if not isinstance(entry.get(name), dict):
            return f"'{name}' is not a JSON object"
    for name in ("layout_bytes", "excluded", "errors", "methods"):
        if name in entry and not isinstance(entry[name], dict):
            return f"'{name}' is not a JSON object"
    for backend, per_m in entry["times_us"].items():
        if not isinstance(per_m, dict):
            return f"times_us[{backend!r}] is not a JSON object"
        try:
            _times(per_m)
        except (TypeError, ValueError) as e:
            return f"times_us[{backend!r}]: {e}"
    for backend, n in entry.get("layout_bytes", {}).items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return f"layout_bytes[{backend!r}] is not a byte count ({n!r})"
    return None


TABLE = TableStore("qmoe-tuning", "tuning.json", ENV_VAR, validate_entry)
"""The tuning table's store (path rules, damage handling, locked atomic writes)."""


def default_path():
    """$QMOE_TUNING_FILE, else $XDG_CACHE_HOME/qmoe/tuning.json, else ~/.cache/qmoe/tuning.json."""
    return TABLE.path()


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
    return entry_key(problem_key(env, fmt, shape), env["versions"]), entry


def merge_entry(old: dict | None, new: dict) -> dict:
    """`new` laid over `old` (same key): per backend, new times replace the same token counts
    and keep the others; a backend measured now leaves `excluded`; errors of re-measured token
    counts are dropped. So a `qmoe tune` of one backend or a few token counts keeps the rest."""
    if not old:
        return new
    out = {**old, **{k: v for k, v in new.items() if k not in ("times_us", "methods", "layout_bytes",
                                                                 "excluded", "errors")}}
    times = {b: dict(d) for b, d in old.get("times_us", {}).items()}
    errors = {b: dict(d) for b, d in old.get("errors", {}).items()}
    for b, d in new["times_us"].items():
        times.setdefault(b, {}).update(d)
        for m in d:
            errors.get(b, {}).pop(m, None)
    for b, d in new.get("errors", {}).items():
        errors.setdefault(b, {}).update(d)
        for m in d:
            times.get(b, {}).pop(m, None)
    excluded = {b: why for b, why in old.get("excluded", {}).items() if b not in new["times_us"]}
    excluded.update(new.get("excluded", {}))
    for b in new.get("excluded", {}):
        times.pop(b, None)  # not usable any more: its old times must not choose it
    out["times_us"] = {b: d for b, d in times.items() if d}
    out["errors"] = {b: d for b, d in errors.items() if d}
    out["excluded"] = excluded
    out["methods"] = {**old.get("methods", {}), **new.get("methods", {})}
    out["layout_bytes"] = {**old.get("layout_bytes", {}), **new.get("layout_bytes", {})}
    return out


def write_entries(entries: dict, path=None):
    """Merge `entries` (key -> entry, from `make_entry`) into the tuning table (`merge_entry`
    per key), under the lock, atomically. Returns the path."""
    def change(table):
        for key, entry in entries.items():
            table[key] = merge_entry(table.get(key), entry)

    return TABLE.update(change, path)


def read_table(path=None) -> dict:
    """The tuning table at `path` (default: `default_path()`): empty when missing; a damaged
    file or entry is ignored with a warning naming it."""
    return TABLE.read(path)


def lookup(spec, fmt: str, device, table=None) -> tuple[str, dict] | None:
    """The (key, entry) measured for this GPU, these library versions, format and shape, or None.

    table: a table dict (from `read_table`), a path, or None for `default_path()`.
    Entries for this GPU, format and shape measured under other library versions are
    ignored with a warning saying which versions differ.
    """
    if table is None or not isinstance(table, dict):
        table = read_table(table)
    env = environment(device)
    problem = problem_key(env, fmt, shape_of(spec))
    key = entry_key(problem, env["versions"])
    entries = table.get("entries", {})
    if key in entries:
        why = validate_entry(entries[key])
        if why is None:
            return key, entries[key]
        warnings.warn(f"qmoe tuning: ignoring the malformed entry for {problem}: {why}", stacklevel=2)
    for other, diff in stale(problem, env["versions"], entries):
        warnings.warn(f"qmoe tuning: ignoring the entry for {problem} measured with {diff}; "
                      f"run `qmoe tune` to measure this installation", stacklevel=2)
    return None


def entry_times(entry: dict) -> dict:
    """backend -> {M: us} of a validated entry."""
    return {b: _times(d) for b, d in entry["times_us"].items()}


__all__ = ["ENV_VAR", "TABLE", "default_path", "entry_times", "environment", "library_versions", "lookup",
           "make_entry", "merge_entry", "problem_key", "read_table", "shape_of", "validate_entry",
           "write_entries"]
