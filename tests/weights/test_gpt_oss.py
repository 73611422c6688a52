"""GPT-OSS safetensors checkpoints: hand-built files, save/load round trips, malformed files."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from conftest import assert_same_weights

import qmoe
from qmoe import ExpertWeights, load_gpt_oss, save_gpt_oss
from qmoe.backends.reference import reference_moe
from qmoe.weights import deinterleave_gate_up as _deinterleave, interleave_gate_up as _interleave

E, I, H = 2, 64, 96  # H/32 = 3 blocks per row, I/32 = 2
P = "model.layers.{}.mlp."
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def pack_by_hand(codes):
    """[..., K] codes -> [..., K/32, 16] bytes the GPT-OSS way: byte b holds element 2b (low) and 2b+1 (high)."""
    lo, hi = codes[..., 0::2].to(torch.int32), codes[..., 1::2].to(torch.int32)
    b = (lo | (hi << 4)).to(torch.uint8)
    return b.reshape(*codes.shape[:-1], codes.shape[-1] // 32, 16)


def decode_by_hand(codes, scale_bytes):
    """codes [..., K], scale bytes [..., K/32] -> float64 values code * 2^(byte - 127)."""
    v = torch.tensor(E2M1, dtype=torch.float64)[codes.long()]
    return v * torch.exp2(scale_bytes.double() - 127).repeat_interleave(32, dim=-1)


def hand_built_layer(layer=0, seed=0):
    """Tensors of one layer written row by row in the checkpoint's interleaved order, plus the
    canonical [gate; up] float64 weights they must load as."""
    g = torch.Generator().manual_seed(seed)
    codes = lambda *s: torch.randint(0, 16, s, generator=g, dtype=torch.uint8)  # noqa: E731
    scales = lambda *s: torch.randint(118, 136, s, generator=g, dtype=torch.uint8)  # noqa: E731
    gate_c, up_c, down_c = codes(E, I, H), codes(E, I, H), codes(E, H, I)
    gate_s, up_s, down_s = scales(E, I, H // 32), scales(E, I, H // 32), scales(E, H, I // 32)
    gate_b, up_b = torch.randn(E, I, generator=g).bfloat16(), torch.randn(E, I, generator=g).bfloat16()
    blocks = torch.empty(E, 2 * I, H // 32, 16, dtype=torch.uint8)
    sc = torch.empty(E, 2 * I, H // 32, dtype=torch.uint8)
    bias = torch.empty(E, 2 * I, dtype=torch.bfloat16)
    for j in range(I):  # even rows gate ("glu"), odd rows up ("linear")
        blocks[:, 2 * j], blocks[:, 2 * j + 1] = pack_by_hand(gate_c[:, j]), pack_by_hand(up_c[:, j])
        sc[:, 2 * j], sc[:, 2 * j + 1] = gate_s[:, j], up_s[:, j]
        bias[:, 2 * j], bias[:, 2 * j + 1] = gate_b[:, j], up_b[:, j]
    p = P.format(layer)
    tensors = {
        p + "experts.gate_up_proj_blocks": blocks,
        p + "experts.gate_up_proj_scales": sc,
        p + "experts.gate_up_proj_bias": bias,
        p + "experts.down_proj_blocks": pack_by_hand(down_c),
        p + "experts.down_proj_scales": down_s,
        p + "experts.down_proj_bias": torch.randn(E, H, generator=g).bfloat16(),
        p + "router.weight": torch.randn(E, H, generator=g).bfloat16(),
        p + "router.bias": torch.randn(E, generator=g).bfloat16(),
    }
    want = {
        "w13": torch.cat([decode_by_hand(gate_c, gate_s), decode_by_hand(up_c, up_s)], dim=1),
        "w2": decode_by_hand(down_c, down_s),
        "b13": torch.cat([gate_b, up_b], dim=1).float(),
    }
    return tensors, want


def test_interleave_round_trip_and_order():
    x = torch.randn(3, 10, 4, 5)
    assert torch.equal(_deinterleave(_interleave(x)), x)
    assert torch.equal(_interleave(_deinterleave(x)), x)
    rows = torch.arange(8).reshape(1, 8)
    assert _deinterleave(rows).tolist() == [[0, 2, 4, 6, 1, 3, 5, 7]]
    assert _interleave(torch.tensor([[10, 11, 12, 20, 21, 22]])).tolist() == [[10, 20, 11, 21, 12, 22]]


def test_load_hand_built_checkpoint(tmp_path):
    tensors, want = hand_built_layer(layer=3)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    layer = load_gpt_oss(str(path), 3)
    w = layer.weights
    assert isinstance(w, ExpertWeights) and w.format == "mxfp4"
    assert (w.num_experts, w.intermediate_size, w.hidden_size) == (E, I, H)
    assert torch.equal(qmoe.dequantize(w.w13).double(), want["w13"])  # rows [gate; up]
    assert torch.equal(qmoe.dequantize(w.w2).double(), want["w2"])
    assert w.b13.dtype == torch.float32 and torch.equal(w.b13, want["b13"])
    assert torch.equal(w.b2, tensors[P.format(3) + "experts.down_proj_bias"].float())
    assert torch.equal(layer.router_weight, tensors[P.format(3) + "router.weight"])
    assert torch.equal(layer.router_bias, tensors[P.format(3) + "router.bias"])
    assert layer.router_weight.shape == (E, H) and layer.router_bias.shape == (E,)
    # also from a pathlib.Path
    assert torch.equal(load_gpt_oss(path, 3).weights.w13.data, w.w13.data)


def random_layer(seed):
    g = torch.Generator().manual_seed(seed)
    w = ExpertWeights.from_float(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g), "mxfp4",
                                 torch.randn(E, 2 * I, generator=g).bfloat16(), torch.randn(E, H, generator=g).bfloat16())
    return w, torch.randn(E, H, generator=g).bfloat16(), torch.randn(E, generator=g).bfloat16()


def assert_same_layer(a, b):
    assert_same_weights(a[0], b[0])
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_save_load_round_trip_single_file(tmp_path):
    layers = {0: random_layer(0), 2: random_layer(1)}
    path = str(tmp_path / "ckpt.safetensors")
    save_gpt_oss(path, layers)
    for i, layer in layers.items():
        assert_same_layer(load_gpt_oss(path, i), layer)
    # what was written is the interleaved GPT-OSS layout, not the canonical one
    w = layers[2][0]
    with safe_open(path, framework="pt") as f:
        blocks = f.get_tensor(P.format(2) + "experts.gate_up_proj_blocks")
        bias = f.get_tensor(P.format(2) + "experts.gate_up_proj_bias")
    assert blocks.shape == (E, 2 * I, H // 32, 16) and blocks.dtype == torch.uint8
    assert torch.equal(blocks[:, 0::2].reshape(E, I, H // 2), w.w13.data[:, :I])
    assert torch.equal(blocks[:, 1::2].reshape(E, I, H // 2), w.w13.data[:, I:])
    assert bias.dtype == torch.bfloat16 and torch.equal(bias[:, 1::2].float(), w.b13[:, I:])


def test_save_load_round_trip_folder_with_index(tmp_path):
    layers = {0: random_layer(2), 1: random_layer(3), 5: random_layer(4)}
    folder = tmp_path / "ckpt"
    save_gpt_oss(str(folder), layers)
    with open(folder / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) == 3 and len(weight_map) == 3 * 8
    assert all((folder / fn).exists() for fn in weight_map.values())
    for i, layer in layers.items():
        assert_same_layer(load_gpt_oss(str(folder), i), layer)
    os.remove(folder / "model.safetensors.index.json")  # a folder without an index still loads
    assert_same_layer(load_gpt_oss(str(folder), 1), layers[1])


def test_save_without_biases_writes_zeros(tmp_path):
    w, rw, rb = random_layer(5)
    w = ExpertWeights(w.w13, w.w2)
    path = str(tmp_path / "nobias.safetensors")
    save_gpt_oss(path, {0: (w, rw, rb)})
    back = load_gpt_oss(path, 0).weights
    assert (back.b13 == 0).all() and (back.b2 == 0).all() and torch.equal(back.w13.data, w.w13.data)


def test_loaded_layer_computes_with_gate_and_up_in_place(tmp_path):
    tensors, want = hand_built_layer(layer=0, seed=1)
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    layer = load_gpt_oss(path, 0)
    spec = qmoe.MoESpec(E, 1, H, I, qmoe.SwiGLU(alpha=1.702, beta=1.0, limit=7.0), bias=True)
    x = torch.randn(3, H, dtype=torch.float64)
    ids = torch.tensor([[0], [1], [1]])
    out = reference_moe(spec, layer.weights, x, ids, torch.ones(3, 1))
    # gate is row j of the even rows: a swapped gate/up would change every output
    for m in range(3):
        h = want["w13"][ids[m, 0]] @ x[m] + want["b13"][ids[m, 0]].double()
        gate, up = h[:I].clamp(max=7.0), h[I:].clamp(-7.0, 7.0)
        a = (up + 1.0) * gate * torch.sigmoid(1.702 * gate)
        y = want["w2"][ids[m, 0]] @ a + tensors[P.format(0) + "experts.down_proj_bias"][ids[m, 0]].double()
        assert torch.allclose(out[m], y, rtol=1e-10, atol=1e-10)


def _malformed(tmp_path, edit):
    tensors, _ = hand_built_layer()
    edit(tensors)
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path)
    return path


p0 = P.format(0)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop(p0 + "experts.down_proj_scales"),
     rf"checkpoint: tensor {p0}experts.down_proj_scales is missing \(expected torch.uint8 of shape \[2, 96, 2\]\)"),
    (lambda t: t.pop(p0 + "router.bias"), rf"tensor {p0}router.bias is missing \(expected torch.bfloat16 of shape \[2\]\)"),
    (lambda t: t.pop(p0 + "experts.gate_up_proj_blocks"),
     rf"tensor {p0}experts.gate_up_proj_blocks is missing \(expected uint8 of shape \[E, 2I, H/32, 16\]"),
    (lambda t: t.update({p0 + "experts.gate_up_proj_bias": t[p0 + "experts.gate_up_proj_bias"].float()}),
     rf"tensor {p0}experts.gate_up_proj_bias: expected torch.bfloat16 of shape \[2, 128\], got torch.float32 of shape \[2, 128\]"),
    (lambda t: t.update({p0 + "experts.down_proj_blocks": t[p0 + "experts.down_proj_blocks"].to(torch.int8)}),
     rf"tensor {p0}experts.down_proj_blocks: expected torch.uint8 of shape \[2, 96, 2, 16\], got torch.int8"),
    (lambda t: t.update({p0 + "router.weight": torch.zeros(E, H + 1, dtype=torch.bfloat16)}),
     rf"tensor {p0}router.weight: expected torch.bfloat16 of shape \[2, 96\], got torch.bfloat16 of shape \[2, 97\]"),
    (lambda t: t.update({p0 + "experts.gate_up_proj_scales": torch.zeros(E, 2 * I, 2, dtype=torch.uint8)}),
     rf"tensor {p0}experts.gate_up_proj_scales: expected torch.uint8 of shape \[2, 128, 3\], got torch.uint8 of shape \[2, 128, 2\]"),
    (lambda t: t.update({p0 + "experts.gate_up_proj_blocks": torch.zeros(E, 2 * I, 6, 8, dtype=torch.uint8)}),
     rf"tensor {p0}experts.gate_up_proj_blocks: expected uint8 of shape \[E, 2I, H/32, 16\] with I a multiple of 32, got shape \[2, 128, 6, 8\]"),
    (lambda t: t.update({p0 + "experts.gate_up_proj_blocks": torch.zeros(E, 2 * 48, 3, 16, dtype=torch.uint8)}),
     r"expected uint8 of shape \[E, 2I, H/32, 16\] with I a multiple of 32, got shape \[2, 96, 3, 16\]"),
])
def test_malformed_checkpoint_names_the_tensor_and_expectation(tmp_path, edit, match):
    path = _malformed(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        load_gpt_oss(path, 0)


def test_bad_paths_and_layers(tmp_path):
    tensors, _ = hand_built_layer()
    path = str(tmp_path / "ok.safetensors")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"tensor model.layers.4.mlp.experts.gate_up_proj_blocks is missing"):
        load_gpt_oss(path, 4)
    with pytest.raises(ValueError, match=r"path: expected a .safetensors file or a folder, got '.*nothing' \(not found\)"):
        load_gpt_oss(str(tmp_path / "nothing"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"path: no .safetensors files in folder"):
        load_gpt_oss(str(tmp_path / "empty"), 0)


def test_save_rejects_bad_layers(tmp_path):
    w, rw, rb = random_layer(6)
    g = torch.Generator().manual_seed(7)
    nv = ExpertWeights.from_float(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g), "nvfp4")
    path = str(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"layers\[0\]: GPT-OSS checkpoints hold mxfp4 ExpertWeights, got nvfp4"):
        save_gpt_oss(path, {0: (nv, rw, rb)})
    with pytest.raises(ValueError, match=r"layers\[1\].router_weight: expected shape \[2, 96\], got \[2, 95\]"):
        save_gpt_oss(path, {1: (w, rw[:, :95], rb)})
    with pytest.raises(ValueError, match=r"layers\[1\].router_bias: expected shape \[2\], got \[3\]"):
        save_gpt_oss(path, {1: (w, rw, torch.zeros(3))})
    assert not os.path.exists(path)
