"""GPT-OSS Hugging Face checkpoints (safetensors) <-> canonical ExpertWeights.

Checkpoint layout of layer i (prefix model.layers.{i}.mlp.):
  experts.gate_up_proj_blocks  uint8 [E, 2I, H/32, 16]  MXFP4 codes, low nibble = even element
  experts.gate_up_proj_scales  uint8 [E, 2I, H/32]      E8M0 exponent bytes
  experts.gate_up_proj_bias    bf16  [E, 2I]
  experts.down_proj_blocks     uint8 [E, H, I/32, 16]
  experts.down_proj_scales     uint8 [E, H, I/32]
  experts.down_proj_bias       bf16  [E, H]
  router.weight                bf16  [E, H];  router.bias  bf16 [E]
Gate and up are INTERLEAVED along the 2I rows (even rows gate, odd rows up); the
canonical w13 has them stacked [gate; up] (qmoe.weights.deinterleave_gate_up / interleave_gate_up,
inverses).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..formats import QuantizedTensor
from .layout import deinterleave_gate_up, interleave_gate_up

if TYPE_CHECKING:  # a runtime import would be circular: weights/__init__ imports this module
    from . import ExpertWeights

_P = "model.layers.{layer}.mlp."
_INDEX = "model.safetensors.index.json"


class GptOssLayer(NamedTuple):
    """weights: ExpertWeights (mxfp4); router_weight: [E, H] float; router_bias: [E] float."""

    weights: "ExpertWeights"
    router_weight: torch.Tensor
    router_bias: torch.Tensor


class _Reader:
    """Reads named tensors from one .safetensors file or a folder (with or without an index).

    Every failure is a ValueError naming the file: a truncated or garbage file, a broken index,
    an index naming a file that is not there."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        if os.path.isfile(path):
            files = [path]
            self.where = None
        elif os.path.isdir(path):
            idx = os.path.join(path, _INDEX)
            if os.path.exists(idx):
                wm = _read_index(idx)
                self.where = {k: os.path.join(path, v) for k, v in wm.items()}
                files = sorted(set(self.where.values()))
                for fn in files:
                    if not os.path.isfile(fn):
                        raise ValueError(f"checkpoint: index {idx} names {os.path.basename(fn)}, which is not in "
                                         f"{path}")
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
                self.where = None
            if not files:
                raise ValueError(f"path: no .safetensors files in folder {path}")
        else:
            raise ValueError(f"path: expected a .safetensors file or a folder, got {path!r} (not found)")
        if self.where is None:
            self.where = {}
            for fn in files:
                with self._open(fn) as f:
                    for k in f.keys():
                        self.where[k] = fn

    def _open(self, fn: str):
        try:
            return self._safe_open(fn, framework="pt")
        except Exception as e:  # safetensors raises its own error type for truncated or garbage files
            raise ValueError(f"checkpoint: {fn} is not a readable safetensors file ({type(e).__name__}: "
                             f"{e})") from None

    def get(self, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"checkpoint: tensor {name} is missing (expected {dtype} of shape {list(shape)})")
        with self._open(self.where[name]) as f:
            try:
                t = f.get_tensor(name)
            except Exception as e:  # data past the end of a truncated file, say
                raise ValueError(f"checkpoint: tensor {name} in {self.where[name]} cannot be read "
                                 f"({type(e).__name__}: {e})") from None
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"checkpoint: tensor {name}: expected {dtype} of shape {list(shape)}, "
                             f"got {t.dtype} of shape {list(t.shape)}")
        return t

    def shape_of(self, name: str, expected: str) -> tuple:
        if name not in self.where:
            raise ValueError(f"checkpoint: tensor {name} is missing (expected {expected})")
        with self._open(self.where[name]) as f:
            return tuple(f.get_slice(name).get_shape())


def _read_index(idx: str) -> dict:
    """The weight_map of a model.safetensors.index.json (ValueError naming the file otherwise)."""
    try:
        with open(idx, encoding="utf-8") as f:
            wm = json.load(f).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"checkpoint: index {idx} is not a JSON object with a weight_map ({e})") from None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError(f"checkpoint: index {idx}: weight_map must map tensor names to file names")
    return wm


def load_gpt_oss(path: str, layer: int) -> GptOssLayer:
    """Read one layer's experts and router from a GPT-OSS safetensors checkpoint.

    path: a .safetensors file, or a folder (with model.safetensors.index.json or not).
    Returns (weights: ExpertWeights mxfp4 with fp32 biases, router_weight [E, H] bf16,
    router_bias [E] bf16), all on the CPU.
    """
    from . import ExpertWeights

    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer: expected a layer index (an int >= 0), got {layer!r}")
    r = _Reader(os.fspath(path))
    p = _P.format(layer=layer)
    expected = "uint8 of shape [E, 2I, H/32, 16] with I a multiple of 32"
    shape = r.shape_of(p + "experts.gate_up_proj_blocks", expected)
    if len(shape) != 4 or shape[3] != 16 or shape[1] % 64:
        raise ValueError(f"checkpoint: tensor {p}experts.gate_up_proj_blocks: expected {expected}, "
                         f"got shape {list(shape)}")
    E, two_i, hb, _ = shape
    H, I = hb * 32, two_i // 2
    w13 = r.get(p + "experts.gate_up_proj_blocks", torch.uint8, (E, two_i, hb, 16))
    s13 = r.get(p + "experts.gate_up_proj_scales", torch.uint8, (E, two_i, hb))
    b13 = r.get(p + "experts.gate_up_proj_bias", torch.bfloat16, (E, two_i))
    w2 = r.get(p + "experts.down_proj_blocks", torch.uint8, (E, H, I // 32, 16))
    s2 = r.get(p + "experts.down_proj_scales", torch.uint8, (E, H, I // 32))
    b2 = r.get(p + "experts.down_proj_bias", torch.bfloat16, (E, H))
    rw = r.get(p + "router.weight", torch.bfloat16, (E, H))
    rb = r.get(p + "router.bias", torch.bfloat16, (E,))
    weights = ExpertWeights(
        QuantizedTensor("mxfp4", (E, two_i, H), deinterleave_gate_up(w13).reshape(E, two_i, H // 2).contiguous(),
                        deinterleave_gate_up(s13).contiguous()),
        QuantizedTensor("mxfp4", (E, H, I), w2.reshape(E, H, I // 2).contiguous(), s2.contiguous()),
        deinterleave_gate_up(b13).float().contiguous(), b2.float().contiguous())
    return GptOssLayer(weights, rw, rb)


def save_gpt_oss(path: str, layers) -> None:
    """Write layers in the GPT-OSS checkpoint layout (inverse of `load_gpt_oss`).

    layers: {layer index: (weights, router_weight [E, H], router_bias [E])}, weights an mxfp4
    ExpertWeights. path ending in .safetensors: one file; otherwise a folder with one file per
    layer and model.safetensors.index.json. Biases and the router are stored in bf16, as GPT-OSS
    stores them (missing biases are written as zeros).
    """
    from safetensors.torch import save_file

    from . import ExpertWeights

    path = os.fspath(path)
    per_layer = {}
    if not isinstance(layers, dict):
        raise ValueError(f"layers: expected {{layer index: (weights, router_weight, router_bias)}}, "
                         f"got {type(layers).__name__}")
    for i, item in layers.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"layers: keys must be layer indices (ints >= 0), got {i!r}")
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"layers[{i}]: expected (weights, router_weight, router_bias), got "
                             f"{type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else ""))
        weights, rw, rb = item
        if not isinstance(weights, ExpertWeights) or weights.format != "mxfp4":
            got = weights.format if isinstance(weights, ExpertWeights) else type(weights).__name__
            raise ValueError(f"layers[{i}]: GPT-OSS checkpoints hold mxfp4 ExpertWeights, got {got}")
        E, two_i, H = weights.w13.shape
        for name, t, shape in (("router_weight", rw, (E, H)), ("router_bias", rb, (E,))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"layers[{i}].{name}: expected shape {list(shape)}, got {got}")
        I = two_i // 2
        p = _P.format(layer=i)
        b13 = weights.b13 if weights.b13 is not None else torch.zeros(E, two_i)
        b2 = weights.b2 if weights.b2 is not None else torch.zeros(E, H)
        per_layer[i] = {
            p + "experts.gate_up_proj_blocks": interleave_gate_up(weights.w13.data.cpu()).reshape(E, two_i, H // 32, 16),
            p + "experts.gate_up_proj_scales": interleave_gate_up(weights.w13.scales.cpu()),
            p + "experts.gate_up_proj_bias": interleave_gate_up(b13.cpu()).to(torch.bfloat16),
            p + "experts.down_proj_blocks": weights.w2.data.cpu().reshape(E, H, I // 32, 16),
            p + "experts.down_proj_scales": weights.w2.scales.cpu(),
            p + "experts.down_proj_bias": b2.cpu().to(torch.bfloat16),
            p + "router.weight": rw.detach().cpu().to(torch.bfloat16),
            p + "router.bias": rb.detach().cpu().to(torch.bfloat16),
        }
    per_layer = {i: {k: v.contiguous() for k, v in t.items()} for i, t in per_layer.items()}
    if path.endswith(".safetensors"):
        save_file({k: v for t in per_layer.values() for k, v in t.items()}, path)
        return
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for n, (i, tensors) in enumerate(sorted(per_layer.items())):
        fn = f"model-{n + 1:05d}-of-{len(per_layer):05d}.safetensors"
        save_file(tensors, os.path.join(path, fn))
        weight_map.update({k: fn for k in tensors})
    tmp = os.path.join(path, _INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    os.replace(tmp, os.path.join(path, _INDEX))
