"""`qmoe env`: what is installed here, and which backend can run which format (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

import torch

from ..kernels import interpreted

from .. import FORMATS, __version__, presets
from ..backends import BACKEND_NAMES
from .common import add_json_argument, emit_json, json_to_stdout, load_backend, output_path

PROBE_PRESET = "gpt-oss-20b"
"""The spec backends are asked about: a real, common shape (support rarely depends on the shape)."""


def package_version(dist: str, module: str) -> str:
    """Installed version of a distribution, found without importing its module (importing
    flashinfer can take seconds and log), or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return "installed (version unknown)" if found else "not installed"


def gpu_info() -> dict | str:
    """{"name", "compute_capability", "count"} of GPU 0, or "none"."""
    if not torch.cuda.is_available():
        return "none"
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "count": torch.cuda.device_count()}


def _load(name: str):
    """(backend, None), or (None, why it cannot be imported); never raises."""
    try:
        return load_backend(name), None
    except Exception as e:  # a broken backend module is reported, never fatal
        cause = e.__cause__ if isinstance(e.__cause__, ImportError) else e
        from ..backends.registry import MODULES

        missing = MODULES.get(name, name)
        if isinstance(cause, ModuleNotFoundError) and cause.name == missing:
            return None, f"not available in this build ({missing} is missing)"
        return None, f"import failed: {type(cause).__name__}: {cause}"


def backend_support(name: str, spec, device: torch.device) -> dict:
    """{"formats": {format: {"usable": bool, "reason": str}}, "capturable", "tunable",
    "first_use", "experimental"} for one backend; never raises."""
    backend, error = _load(name)
    if backend is None:
        return {"formats": {fmt: {"usable": False, "reason": error} for fmt in FORMATS},
                "capturable": None, "tunable": None, "first_use": "", "experimental": None}
    out = {}
    for fmt in FORMATS:
        try:
            ok, reason = backend.supports(spec, fmt, device)
        except Exception as e:  # supports() must not raise; if it does, that is the reason
            ok, reason = False, f"supports() raised {type(e).__name__}: {e}"
        out[fmt] = {"usable": bool(ok), "reason": str(reason)}
    return {"formats": out, "capturable": bool(backend.capturable), "tunable": bool(backend.tunable),
            "first_use": str(backend.first_use), "experimental": bool(getattr(backend, "experimental", False))}


def collect() -> dict:
    """Everything `qmoe env` reports, as plain JSON-ready data."""
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    spec = presets[PROBE_PRESET]
    return {
        "qmoe": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": package_version("triton", "triton"),
        "flashinfer": package_version("flashinfer-python", "flashinfer"),
        "humming": package_version("humming-kernels", "humming"),
        "vllm": package_version("vllm", "vllm"),
        "triton_kernels": package_version("triton_kernels", "triton_kernels"),
        "gpu": gpu_info(),
        "device": str(device),
        "triton_interpret": interpreted(),
        "triton_interpret_value": os.environ.get("TRITON_INTERPRET"),
        "probe": {"preset": PROBE_PRESET, "device": str(device)},
        "backends": {name: backend_support(name, spec, device) for name in BACKEND_NAMES},
        "routing": _routing(spec, device),
    }


def _routing(spec, device) -> dict:
    """Which routing `MoE.__call__` runs for the probe preset here: the fused Triton kernel or
    the PyTorch reference, and why."""
    from ..routing import routing_support

    sup = routing_support(spec, device)
    return {"fused": sup.ok, "reason": sup.reason}


def add_arguments(parser) -> None:
    add_json_argument(parser, "the report")


def run(args) -> int:
    output_path(args.json, "--json")
    info = collect()
    emit_json(args, info)
    if not json_to_stdout(args):
        print_report(info)
    return 0


def print_report(info: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    gpu = info["gpu"]
    gpu_text = "none" if gpu == "none" else f"{gpu['name']} (SM {gpu['compute_capability']}, {gpu['count']} GPU)"
    versions = Table(show_header=False, box=None, pad_edge=False)
    versions.add_column(style="bold")
    versions.add_column()
    for key, value in (("qmoe", info["qmoe"]), ("python", f"{info['python']} ({info['platform']})"),
                       ("torch", f"{info['torch']} (CUDA {info['cuda']})"), ("triton", info["triton"]),
                       ("flashinfer", info["flashinfer"]), ("humming", info["humming"]), ("vllm", info["vllm"]),
                       ("triton_kernels", info["triton_kernels"]), ("GPU", gpu_text),
                       ("TRITON_INTERPRET", f"{info['triton_interpret_value']} (interpreter on)"
                        if info["triton_interpret"] else
                        "not set" if gpu != "none" and not info["triton_interpret_value"] else
                        f"{info['triton_interpret_value'] or 'not set'} (Triton kernels run on a CPU only with "
                        f"TRITON_INTERPRET=1)"),
                       ("routing", ("fused Triton kernel: " if info["routing"]["fused"] else "")
                        + info["routing"]["reason"])):
        versions.add_row(key, escape(str(value)))
    console.print(versions)

    table = Table(title=f"backends for {info['probe']['preset']} shapes on {info['probe']['device']}")
    table.add_column("backend", style="bold", no_wrap=True)
    table.add_column("formats", max_width=18)
    table.add_column("usable", no_wrap=True)
    table.add_column("why / why not", overflow="fold")
    for name, b in info["backends"].items():
        per_fmt = b["formats"]
        # formats sharing an answer share a row: most backends give one reason for several
        groups: dict[tuple, list[str]] = {}
        for fmt, s in per_fmt.items():
            groups.setdefault((s["usable"], s["reason"]), []).append(fmt)
        facts = [] if b["capturable"] is None else [
            "CUDA-graph capturable" if b["capturable"] else "not capturable",
            *(["tunable (qmoe tune --kernels)"] if b["tunable"] else []),
            *(["experimental"] if b["experimental"] else []),
            *([f"first use: {b['first_use']}"] if b["first_use"] else [])]
        rows = list(groups.items())
        for i, ((usable, reason), fmts) in enumerate(rows):
            last = i == len(rows) - 1
            why = reason + (("\n" + "; ".join(facts)) if last and facts and any(u for (u, _), _ in rows) else "")
            table.add_row(name if i == 0 else "", "all" if len(fmts) == len(per_fmt) else ", ".join(fmts),
                          "[green]yes[/green]" if usable else "[red]no[/red]", escape(why), end_section=last)
    console.print(table)
