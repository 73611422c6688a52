"""`qmoe env`: what is installed here, and which backend can run which format (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

import torch

from . import FORMATS, __version__, presets
from .backends import BACKEND_NAMES, get_backend

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


def load_backend(name: str):
    """(backend, None), or (None, why it cannot be imported); never raises."""
    try:
        return get_backend(name), None
    except Exception as e:  # a broken backend module is reported, never fatal
        cause = e.__cause__ if isinstance(e.__cause__, ImportError) else e
        missing = f"qmoe.backends.{name}"
        if isinstance(cause, ModuleNotFoundError) and cause.name == missing:
            return None, f"not available in this build ({missing} is missing)"
        e = cause
        return None, f"import failed: {type(e).__name__}: {e}"


def backend_support(name: str, spec, device: torch.device) -> dict:
    """{format: {"usable": bool, "reason": str}} for one backend; never raises."""
    backend, error = load_backend(name)
    if backend is None:
        return {fmt: {"usable": False, "reason": error} for fmt in FORMATS}
    out = {}
    for fmt in FORMATS:
        try:
            ok, reason = backend.supports(spec, fmt, device)
        except Exception as e:  # supports() must not raise; if it does, that is the reason
            ok, reason = False, f"supports() raised {type(e).__name__}: {e}"
        out[fmt] = {"usable": bool(ok), "reason": str(reason)}
    return out


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
        "gpu": gpu_info(),
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "") == "1",
        "probe": {"preset": PROBE_PRESET, "device": str(device)},
        "backends": {name: backend_support(name, spec, device) for name in BACKEND_NAMES},
        "routing": _routing(spec, device),
    }


def _routing(spec, device) -> dict:
    """Which routing `MoE.__call__` runs for the probe preset here: the fused Triton kernel or
    the PyTorch reference, and why."""
    from .dispatch import routing_support

    sup = routing_support(spec, device)
    return {"fused": sup.ok, "reason": sup.reason}


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args) -> int:
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
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
                       ("flashinfer", info["flashinfer"]), ("GPU", gpu_text),
                       ("TRITON_INTERPRET", "1" if info["triton_interpret"] else
                        "not set" if gpu != "none" else
                        "not set (Triton kernels run on a CPU only with TRITON_INTERPRET=1)"),
                       ("routing", ("fused Triton kernel: " if info["routing"]["fused"] else "")
                        + info["routing"]["reason"])):
        versions.add_row(key, escape(str(value)))
    console.print(versions)

    table = Table(title=f"backends for {info['probe']['preset']} shapes on {info['probe']['device']}")
    table.add_column("backend", style="bold", no_wrap=True)
    table.add_column("formats", max_width=18)
    table.add_column("usable", no_wrap=True)
    table.add_column("why / why not", overflow="fold")
    for name, per_fmt in info["backends"].items():
        # formats sharing an answer share a row: most backends give one reason for several
        groups: dict[tuple, list[str]] = {}
        for fmt, s in per_fmt.items():
            groups.setdefault((s["usable"], s["reason"]), []).append(fmt)
        for i, ((usable, reason), fmts) in enumerate(groups.items()):
            table.add_row(name if i == 0 else "", "all" if len(fmts) == len(per_fmt) else ", ".join(fmts),
                          "[green]yes[/green]" if usable else "[red]no[/red]", escape(reason),
                          end_section=i == len(groups) - 1)
    console.print(table)
