"""compressed-tensors pack-quantized int4: the nibble packing by hand, save/load round trips,
hand-built files, malformed files."""

import pytest
import torch
from conftest import assert_same_weights, save_hand_built

import qmoe
from qmoe.weights import load_compressed_tensors, save_compressed_tensors
from qmoe.weights.compressed_tensors import from_pack_quantized, to_pack_quantized

E, I, H = 3, 32, 64
PREFIX = "model.layers.1.mlp.experts"


def canonical_bytes(values):
    """int values in [-8, 7] [..., K] -> canonical uint8 [..., K/2]: two's complement nibbles, low = even."""
    v = values.to(torch.int32) & 0xF
    return (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8)


def words_by_hand(values):
    """[..., K] values -> int32 [..., K/8]: word j holds (value[8j + i] + 8) in bits 4i..4i+3."""
    u = (values.to(torch.int64) + 8).reshape(*values.shape[:-1], -1, 8)
    w = sum(u[..., i] << (4 * i) for i in range(8))
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def test_packing_matches_the_layout_by_hand_and_inverts():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-8, 8, (5, 64), generator=g)
    data = canonical_bytes(values)
    packed = to_pack_quantized(data)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert torch.equal(packed, words_by_hand(values))
    assert torch.equal(from_pack_quantized(packed), data)
    with pytest.raises(ValueError, match="data: expected uint8"):
        to_pack_quantized(data.to(torch.int16))
    with pytest.raises(ValueError, match="packed: expected int32"):
        from_pack_quantized(packed.to(torch.int64))


def random_int4(seed=0, bias=False):
    spec = qmoe.MoESpec(E, 2, H, I, bias=bias)
    return qmoe.random_weights(spec, "int4", seed=seed)


def test_save_load_round_trip_is_exact(tmp_path):
    w = random_int4()
    save_compressed_tensors(tmp_path / "ck.safetensors", {PREFIX: w})
    back = load_compressed_tensors(tmp_path / "ck.safetensors", PREFIX)
    assert back.format == "int4" and not back.has_bias
    assert_same_weights(back, w)


def hand_built(g, N, K, scale_dtype=torch.bfloat16, bf16_values=True):
    values = torch.randint(-8, 8, (N, K), generator=g)
    scales = torch.rand(N, K // 32, generator=g) + 0.5
    scales = (scales.to(torch.bfloat16) if bf16_values else scales).to(scale_dtype)
    return values, scales


def write_hand_built(path, scale_dtype=torch.bfloat16, skip=None, extra=None, bf16_values=True):
    """A checkpoint written tensor by tensor from integer values and scales; returns the float64
    canonical w13, w2 it must load as."""
    g = torch.Generator().manual_seed(1)
    tensors, experts = {}, []
    for e in range(E):
        mats = {}
        for proj, (N, K) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            values, scales = hand_built(g, N, K, scale_dtype, bf16_values)
            p = f"{PREFIX}.{e}.{proj}"
            tensors[p + ".weight_packed"] = words_by_hand(values)
            tensors[p + ".weight_scale"] = scales
            tensors[p + ".weight_shape"] = torch.tensor([N, K])
            mats[proj] = values.double() * scales.double().repeat_interleave(32, dim=1)
        experts.append(mats)
    return save_hand_built(path, tensors, experts, skip, extra)


def test_hand_built_file_loads_as_its_values(tmp_path):
    w13, w2 = write_hand_built(tmp_path / "ck.safetensors")
    w = load_compressed_tensors(tmp_path / "ck.safetensors", PREFIX)
    assert torch.equal(qmoe.dequantize(w.w13).double(), w13)
    assert torch.equal(qmoe.dequantize(w.w2).double(), w2)


def test_fp32_scales_are_taken_when_bf16_holds_them(tmp_path):
    w13, _ = write_hand_built(tmp_path / "ok.safetensors", scale_dtype=torch.float32)
    assert torch.equal(qmoe.dequantize(load_compressed_tensors(tmp_path / "ok.safetensors", PREFIX).w13).double(), w13)
    write_hand_built(tmp_path / "ck.safetensors", scale_dtype=torch.float32, bf16_values=False)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight_scale in .*"
                                         r"ck\.safetensors: torch\.float32 scales that bf16 cannot hold"):
        load_compressed_tensors(tmp_path / "ck.safetensors", PREFIX)


@pytest.mark.parametrize("case, extra_or_skip, message", [
    ("missing", {"skip": [f"{PREFIX}.1.up_proj.weight_scale"]},
     rf"tensor {PREFIX}\.1\.up_proj\.weight_scale is missing"),
    ("missing expert", {"skip": [f"{PREFIX}.1.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj")
                                 for t in ("weight_packed", "weight_scale", "weight_shape")]},
     rf"tensor {PREFIX}\.1\.gate_proj\.weight_packed is missing \(experts 0\.\.2 are present\)"),
    ("zero point", {"extra": {f"{PREFIX}.0.gate_proj.weight_zero_point": torch.zeros(4, 2, dtype=torch.int32)}},
     r"weight_zero_point: asymmetric int4"),
    ("packed dtype", {"extra": {f"{PREFIX}.2.down_proj.weight_packed": torch.zeros(H, I // 8, dtype=torch.int64)}},
     rf"tensor {PREFIX}\.2\.down_proj\.weight_packed in .*ck\.safetensors: expected int32 of shape \[64, 4\]"),
    ("group 16", {"extra": {f"{PREFIX}.0.down_proj.weight_scale": torch.ones(H, I // 16, dtype=torch.bfloat16)}},
     r"down_proj\.weight_scale in .*: group size 16 .*qmoe's int4 is group 32"),
    ("shape", {"extra": {f"{PREFIX}.0.up_proj.weight_shape": torch.tensor([I, H, 1])}},
     r"up_proj\.weight_shape in .*: expected an integer tensor \[2\]"),
    ("odd expert", {"extra": {f"{PREFIX}.0.down_proj.weight_shape": torch.tensor([H, 2 * I]),
                              f"{PREFIX}.0.down_proj.weight_packed": torch.zeros(H, I // 4, dtype=torch.int32),
                              f"{PREFIX}.0.down_proj.weight_scale": torch.ones(H, I // 16, dtype=torch.bfloat16)}},
     r"expert 0 of .*: gate_proj \[32, 64\], up_proj \[32, 64\] and down_proj \[64, 64\] do not make one expert"),
])
def test_malformed_files_name_the_tensor(tmp_path, case, extra_or_skip, message):
    write_hand_built(tmp_path / "ck.safetensors", **extra_or_skip)
    with pytest.raises(ValueError, match=message):
        load_compressed_tensors(tmp_path / "ck.safetensors", PREFIX)


def test_wrong_prefix_and_bad_arguments(tmp_path):
    write_hand_built(tmp_path / "ck.safetensors")
    with pytest.raises(ValueError, match=r"no tensors model\.layers\.0\.mlp\.experts\.<expert>\.gate_proj"):
        load_compressed_tensors(tmp_path / "ck.safetensors", "model.layers.0.mlp.experts")
    with pytest.raises(ValueError, match="prefix: expected"):
        load_compressed_tensors(tmp_path / "ck.safetensors", "")
    with pytest.raises(ValueError, match="path: expected a .safetensors file or a folder"):
        load_compressed_tensors(tmp_path / "nothing.safetensors", PREFIX)
    with pytest.raises(ValueError, match=r"layers\['p'\]: .* int4 ExpertWeights without biases, got int4 weights "
                                         r"with biases"):
        save_compressed_tensors(tmp_path / "x.safetensors", {"p": random_int4(bias=True)})
    mx = qmoe.random_weights(qmoe.MoESpec(E, 2, H, I), "mxfp4")
    with pytest.raises(ValueError, match="got mxfp4 weights"):
        save_compressed_tensors(tmp_path / "x.safetensors", {"p": mx})


def test_folder_with_two_layers(tmp_path):
    a, b = random_int4(seed=1), random_int4(seed=2)
    save_compressed_tensors(tmp_path / "ck", {"model.layers.0.mlp.experts": a, "model.layers.1.mlp.experts": b})
    got = load_compressed_tensors(tmp_path / "ck", "model.layers.1.mlp.experts")
    assert torch.equal(got.w13.data, b.w13.data) and torch.equal(got.w2.scales, b.w2.scales)
