"""ModelOpt NVFP4 checkpoints: save/load round trips, hand-built files, malformed files."""

import pytest
import torch
from conftest import assert_same_weights, save_hand_built

import qmoe
from qmoe.weights import load_modelopt_nvfp4, save_modelopt_nvfp4

E, I, H = 3, 32, 64
PREFIX = "model.layers.2.mlp.experts"
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def random_nvfp4(seed=0, bias=False):
    return qmoe.random_weights(qmoe.MoESpec(E, 2, H, I, bias=bias), "nvfp4", seed=seed)


def test_save_load_round_trip_is_exact(tmp_path):
    w = random_nvfp4()
    save_modelopt_nvfp4(tmp_path / "ck.safetensors", {PREFIX: w})
    back = load_modelopt_nvfp4(tmp_path / "ck.safetensors", PREFIX)
    assert back.format == "nvfp4" and not back.has_bias
    assert_same_weights(back, w)


def write_hand_built(path, g2_up=None, scale_2_shape=(), extra=None, skip=None):
    """Codes, e4m3 scales and global scales drawn per matrix and packed by hand (low nibble = even
    element); returns the float64 w13, w2 they must load as (code * scale * scale_2)."""
    g = torch.Generator().manual_seed(3)
    tensors, experts = {}, []
    for e in range(E):
        gs = torch.rand((), generator=g) * 1e-2 + 1e-3
        mats = {}
        for proj, (N, K) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            codes = torch.randint(0, 16, (N, K), generator=g)
            scales = (torch.rand(N, K // 16, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
            s2 = gs if proj != "up_proj" or g2_up is None else torch.tensor(g2_up)
            s2 = gs * 3 if proj == "down_proj" else s2
            p = f"{PREFIX}.{e}.{proj}"
            tensors[p + ".weight"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
            tensors[p + ".weight_scale"] = scales
            tensors[p + ".weight_scale_2"] = s2.float().reshape(scale_2_shape).clone()
            tensors[p + ".input_scale"] = torch.tensor(1.0)
            v = torch.tensor(E2M1, dtype=torch.float64)[codes]
            mats[proj] = v * scales.double().repeat_interleave(16, dim=1) * float(s2)
        experts.append(mats)
    return save_hand_built(path, tensors, experts, skip, extra)


@pytest.mark.parametrize("scale_2_shape", [(), (1,)])
def test_hand_built_file_loads_as_its_values(tmp_path, scale_2_shape):
    w13, w2 = write_hand_built(tmp_path / "ck.safetensors", scale_2_shape=scale_2_shape)
    w = load_modelopt_nvfp4(tmp_path / "ck.safetensors", PREFIX)
    assert w.w13.global_scale.shape == (E,) and w.w2.global_scale.shape == (E,)
    torch.testing.assert_close(qmoe.dequantize(w.w13).double(), w13, rtol=1e-6, atol=0)  # fp32 products
    torch.testing.assert_close(qmoe.dequantize(w.w2).double(), w2, rtol=1e-6, atol=0)


def test_gate_and_up_must_share_the_global_scale(tmp_path):
    write_hand_built(tmp_path / "ck.safetensors", g2_up=0.5)
    with pytest.raises(ValueError, match=rf"tensors {PREFIX}\.0\.gate_proj\.weight_scale_2 \(.*\) and "
                                         rf"{PREFIX}\.0\.up_proj\.weight_scale_2 \(0\.5\) differ"):
        load_modelopt_nvfp4(tmp_path / "ck.safetensors", PREFIX)


@pytest.mark.parametrize("extra_or_skip, message", [
    ({"skip": [f"{PREFIX}.2.down_proj.weight_scale_2"]}, rf"tensor {PREFIX}\.2\.down_proj\.weight_scale_2 is missing"),
    ({"extra": {f"{PREFIX}.0.gate_proj.weight_scale": torch.ones(I, H // 16, dtype=torch.bfloat16)}},
     rf"tensor {PREFIX}\.0\.gate_proj\.weight_scale in .*ck\.safetensors: expected float8_e4m3fn of shape \[32, 4\]"),
    ({"extra": {f"{PREFIX}.1.up_proj.weight": torch.zeros(I, H // 2, dtype=torch.int8)}},
     rf"{PREFIX}\.1\.up_proj\.weight in .*: expected uint8 \[N, K/2\]"),
    ({"extra": {f"{PREFIX}.1.down_proj.weight_scale_2": torch.ones(2)}},
     r"down_proj\.weight_scale_2 in .*: expected a float32 scalar"),
    ({"extra": {f"{PREFIX}.1.down_proj.weight_scale_2": torch.tensor(0.0)}},
     r"down_proj\.weight_scale_2 in .*: expected a finite positive global scale, got 0\.0"),
])
def test_malformed_files_name_the_tensor(tmp_path, extra_or_skip, message):
    write_hand_built(tmp_path / "ck.safetensors", **extra_or_skip)
    with pytest.raises(ValueError, match=message):
        load_modelopt_nvfp4(tmp_path / "ck.safetensors", PREFIX)


def test_exporter_refuses_other_weights(tmp_path):
    with pytest.raises(ValueError, match="ModelOpt NVFP4 holds nvfp4 ExpertWeights without biases, got nvfp4 "
                                         "weights with biases"):
        save_modelopt_nvfp4(tmp_path / "x.safetensors", {"p": random_nvfp4(bias=True)})
    with pytest.raises(ValueError, match="layers: expected"):
        save_modelopt_nvfp4(tmp_path / "x.safetensors", {})
