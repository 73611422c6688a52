"""filter_cuda_paths: the CUDA environment humming compiles against (STATE.cuda_env)."""

import os

from .._fake import STATE


def filter_cuda_paths(target_version=None, required_headers=None, required_binaries=None, source=None):
    root = STATE.cuda_env
    if required_binaries and "nvcc" in required_binaries and not STATE.nvcc:
        root = None
    include = [] if root is None else [os.path.join(root, "include")]
    for header in required_headers or []:
        if root is not None and not any(os.path.exists(os.path.join(p, header)) for p in include):
            root = None
    if root is None:
        raise RuntimeError("No suitable CUDA 13 environment found. Try: pip install humming-kernels[cu13]")
    return {"source": "fake", "path": root, "include_paths": include,
            "binaries": {"nvcc": os.path.join(root, "bin", "nvcc")} if STATE.nvcc else {}}
