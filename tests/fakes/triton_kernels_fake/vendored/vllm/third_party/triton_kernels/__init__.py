"""Fake vllm.third_party.triton_kernels: the gen_3_5 fake's files under vLLM's name. Like the
real vendored copy they import triton_kernels.* absolutely, so they load only once this package
is registered as sys.modules["triton_kernels"] (what vLLM's import_triton_kernels does)."""

import os

__path__ = [os.path.normpath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4, "gen_3_5", "triton_kernels"))]
