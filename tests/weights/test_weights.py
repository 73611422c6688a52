"""qmoe.ExpertWeights: construction from float weights, accessors and validation."""

import dataclasses

import pytest
import torch

import qmoe
from qmoe import ExpertWeights, dequantize, quantize

E, I, H = 3, 32, 64


def floats(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g),
            torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "bf16"])
def test_from_float_quantizes_each_matrix(fmt):
    w13, w2, b13, b2 = floats()
    w = ExpertWeights.from_float(w13, w2, fmt, b13.bfloat16(), b2)
    assert w.format == fmt and w.w13.format == fmt and w.w2.format == fmt
    assert (w.num_experts, w.intermediate_size, w.hidden_size) == (E, I, H)
    assert torch.equal(dequantize(w.w13), dequantize(quantize(w13, fmt)))
    assert torch.equal(dequantize(w.w2), dequantize(quantize(w2, fmt)))
    assert w.b13.dtype == torch.float32 and torch.equal(w.b13, b13.bfloat16().float())
    assert w.b2.dtype == torch.float32 and torch.equal(w.b2, b2)
    assert w.has_bias and w.device.type == "cpu"
    for e in range(E):
        a, b = w.dequantize_expert(e)
        assert a.shape == (2 * I, H) and b.shape == (H, I)
        assert torch.equal(a, dequantize(w.w13)[e]) and torch.equal(b, dequantize(w.w2)[e])


def test_nbytes():
    w13, w2, b13, b2 = floats()
    w = ExpertWeights.from_float(w13, w2, "mxfp4", b13, b2)
    packed = E * 2 * I * H // 2 + E * 2 * I * H // 32 + E * H * I // 2 + E * H * I // 32
    assert w.nbytes == packed + 4 * (E * 2 * I + E * H)
    assert w.expert_nbytes() == packed // E
    n = ExpertWeights.from_float(w13, w2, "nvfp4")
    assert not n.has_bias
    assert n.expert_nbytes() == (2 * I * H // 2 + 2 * I * H // 16 + 4) + (H * I // 2 + H * I // 16 + 4)


def test_to_moves_everything():
    w13, w2, b13, b2 = floats()
    m = ExpertWeights.from_float(w13, w2, "nvfp4", b13, b2).to("meta")
    assert m.device.type == "meta" and m.w2.device.type == "meta" and m.b13.is_meta and m.b2.is_meta
    assert ExpertWeights.from_float(w13, w2, "int4").to("meta").b13 is None


def _q(shape, fmt="mxfp4"):
    return quantize(torch.randn(*shape), fmt)


@pytest.mark.parametrize("make,match", [
    (lambda: ExpertWeights(torch.zeros(E, 2 * I, H), _q((E, H, I))), r"w13: expected a 3-D QuantizedTensor, got Tensor of shape \[3, 64, 64\]"),
    (lambda: ExpertWeights(_q((2 * I, H)), _q((E, H, I))), r"w13: expected a 3-D QuantizedTensor, got QuantizedTensor of shape \[64, 64\]"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((H, I))), r"w2: expected a 3-D QuantizedTensor, got QuantizedTensor of shape \[64, 32\]"),
    (lambda: ExpertWeights(_q((E, 2 * I + 1, H)), _q((E, H, I))), r"w13: expected \[E, 2I, H\] with an even row count, got \[3, 65, 64\]"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, 2 * I))), r"w2: expected shape \[3, 64, 32\] to match w13 \[3, 64, 64\], got \[3, 64, 64\]"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E + 1, H, I))), r"w2: expected shape \[3, 64, 32\] .* got \[4, 64, 32\]"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, I), "int4")), r"w2: expected format mxfp4 like w13, got int4"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, I)).to("meta")), r"w2: expected device cpu like w13, got meta"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, I)), torch.zeros(E, I)), r"b13: expected float32 of shape \[3, 64\], got torch.float32 \[3, 32\]"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, I)), torch.zeros(E, 2 * I, dtype=torch.bfloat16)), r"b13: expected float32 of shape \[3, 64\], got torch.bfloat16 \[3, 64\]"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, I)), None, torch.zeros(E, I)), r"b2: expected float32 of shape \[3, 64\], got torch.float32 \[3, 32\]"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, I)), None, [0.0]), r"b2: expected float32 of shape \[3, 64\], got list"),
    (lambda: ExpertWeights(_q((E, 2 * I, H)), _q((E, H, I)), torch.zeros(E, 2 * I, device="meta")), r"b13: expected device cpu, got meta"),
    (lambda: ExpertWeights.from_float(torch.zeros(2 * I, H), torch.zeros(E, H, I), "mxfp4"), r"w13: expected a float tensor \[E, 2I, H\], got torch.float32 \[64, 64\]"),
    (lambda: ExpertWeights.from_float(torch.zeros(E, 2 * I, H), torch.zeros(E, H, I, dtype=torch.int8), "int4"), r"w2: expected a float tensor \[E, H, I\], got torch.int8 \[3, 64, 32\]"),
    (lambda: ExpertWeights.from_float(torch.zeros(E, 2 * I, H), None, "mxfp4"), r"w2: expected a float tensor \[E, H, I\], got NoneType"),
    (lambda: ExpertWeights.from_float(torch.zeros(E, 2 * I, H), torch.zeros(E, H, I), "fp8"), r"format: expected one of"),
])
def test_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_exported_names():
    assert qmoe.ExpertWeights is ExpertWeights
    assert callable(qmoe.load_gpt_oss) and callable(qmoe.save_gpt_oss)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_random_weights_shapes_seed_and_scale(fmt):
    from qmoe.weights import random_weights

    spec = qmoe.MoESpec(3, 2, 64, 96, bias=True)
    calls = []
    w = random_weights(spec, fmt, seed=5, on_expert=lambda: calls.append(1))
    assert len(calls) == 2 * 3
    assert (w.format, w.w13.shape, w.w2.shape) == (fmt, (3, 192, 64), (3, 64, 96))
    assert w.b13.shape == (3, 192) and w.b2.shape == (3, 64) and w.b13.dtype == torch.float32
    again = random_weights(spec, fmt, seed=5)
    assert torch.equal(w.w13.data, again.w13.data) and torch.equal(w.b2, again.b2)
    assert not torch.equal(w.w13.data, random_weights(spec, fmt, seed=6).w13.data)
    # default std 1/sqrt(K): the dequantized w2 (K = 96) has std near 0.102
    std = qmoe.dequantize(w.w2).std().item()
    assert 0.09 < std < 0.115
    assert random_weights(dataclasses.replace(spec, bias=False), fmt).b13 is None
