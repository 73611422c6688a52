"""Fake `vllm` (only what qmoe's triton_kernels backend looks for: third_party.triton_kernels)."""
