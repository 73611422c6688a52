"""Shared test helpers: small specs and random canonical weights.

Kernel tests run on the GPU when there is one, else through Triton's interpreter:
TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, before
any test module imports qmoe.kernels.
"""

import dataclasses
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qmoe  # noqa: E402

FAKES = os.path.join(os.path.dirname(__file__), "fakes")
"""Fake packages of the peers' APIs (FlashInfer, triton_kernels, vLLM's ops, humming) for CPU tests."""
if FAKES not in sys.path:
    sys.path.insert(0, FAKES)


def small_spec(E=4, k=2, H=64, I=32, *, bias=True, activation=None, routing=None) -> qmoe.MoESpec:
    """A GPT-OSS-like spec scaled down to run in milliseconds on a CPU."""
    spec = qmoe.MoESpec(E, k, H, I, qmoe.SwiGLU(alpha=1.702, beta=1.0, limit=7.0), bias=bias, name="small")
    if activation is not None:
        spec = dataclasses.replace(spec, activation=activation)
    if routing is not None:
        spec = dataclasses.replace(spec, routing=routing)
    return spec


def random_weights(spec: qmoe.MoESpec, fmt="mxfp4", seed=0, bias=None) -> qmoe.ExpertWeights:
    """Random float weights (std 1/sqrt(K), so activations keep unit scale) quantized to fmt."""
    g = torch.Generator().manual_seed(seed)
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    bias = spec.bias if bias is None else bias
    b13 = torch.randn(E, 2 * I, generator=g) if bias else None
    b2 = torch.randn(E, H, generator=g) if bias else None
    return qmoe.ExpertWeights.from_float(w13, w2, fmt, b13, b2)


def assert_same_weights(a: qmoe.ExpertWeights, b: qmoe.ExpertWeights) -> None:
    """a and b hold the same canonical weights, bitwise: shapes, formats, packed data, scales,
    global scales and biases (absent in both or equal)."""
    for name in ("w13", "w2"):
        qa, qb = getattr(a, name), getattr(b, name)
        assert qa.shape == qb.shape and qa.format == qb.format, name
        for part in ("data", "scales", "global_scale"):
            ta, tb = getattr(qa, part), getattr(qb, part)
            assert (ta is None) == (tb is None), f"{name}.{part}"
            assert ta is None or torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), f"{name}.{part}"
    for name in ("b13", "b2"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None) and (ta is None or torch.equal(ta, tb)), name


def save_hand_built(path, tensors: dict, experts: list, skip=None, extra=None):
    """Write a hand-built per-expert checkpoint and return what it must load as.

    tensors: name -> tensor as the file holds them; experts: per expert {"gate_proj", "up_proj",
    "down_proj": float64 [N, K] matrices the tensors encode}; skip: names to leave out; extra:
    names to add or replace. Returns (w13 [E, 2I, H], w2 [E, H, I]) float64, canonical order."""
    from safetensors.torch import save_file

    tensors = {n: t for n, t in tensors.items() if n not in (skip or ())}
    tensors.update(extra or {})
    save_file(tensors, str(path))
    w13 = torch.stack([torch.cat((m["gate_proj"], m["up_proj"])) for m in experts])
    return w13, torch.stack([m["down_proj"] for m in experts])


def moe_inputs(spec, M, seed=0):
    """x [M, H] bf16, topk_ids [M, k] int32 (distinct experts), topk_weights [M, k] fp32 (softmax)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, spec.hidden_size, generator=g).to(torch.bfloat16)
    ids = torch.rand(M, spec.num_experts, generator=g).topk(spec.top_k, dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(M, spec.top_k, generator=g), dim=1)
    return x, ids, w


def rel_err(out, spec, weights, x, ids, w, shared=None):
    """||out - ref|| / ||ref|| against the float64 reference on the dequantized weights."""
    from qmoe.backends.reference import reference_moe, relative_error

    return relative_error(out, reference_moe(spec, weights, x, ids, w, shared_output=shared, dtype=torch.float64))


@pytest.fixture
def spec():
    return small_spec()


@pytest.fixture
def weights(spec):
    return random_weights(spec)
