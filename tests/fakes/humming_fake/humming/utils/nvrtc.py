from .._fake import STATE


def get_nvrtc_library_path():
    if not STATE.nvrtc:
        raise RuntimeError("Could not locate the NVRTC library in CUDA path")
    return "/fake/cuda/lib64/libnvrtc.so"
