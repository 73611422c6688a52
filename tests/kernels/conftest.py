"""Kernel tests run on the GPU when there is one, else through Triton's interpreter.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at
collection time, before qmoe.kernels is imported by a test.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
