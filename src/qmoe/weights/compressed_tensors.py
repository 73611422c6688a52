"""compressed-tensors "pack-quantized" int4 checkpoints (Kimi-K2 / K2.5 W4A16) <-> canonical int4.

Per expert e of one MoE block, `prefix` = the experts' module name ("model.layers.3.mlp.experts"):
  {prefix}.{e}.gate_proj.weight_packed  int32 [I, H/8]   element 8j+i in bits 4i..4i+3 of word j,
                                                          offset binary: stored = value + 8
  {prefix}.{e}.gate_proj.weight_scale   bf16  [I, H/32]  value = (stored - 8) * scale (symmetric,
                                                          group 32, no zero point)
  {prefix}.{e}.gate_proj.weight_shape   int   [2]        [I, H], the unpacked shape
  {prefix}.{e}.up_proj.*                as gate_proj
  {prefix}.{e}.down_proj.*              [H, I/8], [H, I/32], [H, I]
Canonical int4 keeps two's-complement nibbles (low nibble = even element) in uint8 [.., K/2]: on a
little-endian machine the bytes of a packed word are those nibbles with bit 3 flipped
(`to_pack_quantized` / `from_pack_quantized`, inverses; the one home of that conversion).
The quantization config (config.json: num_bits 4, type int, symmetric, strategy group, group_size
32) is not read: the tensors' shapes say the group size, and other layouts are refused by name.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

import torch

from ..formats import QuantizedTensor
from .gpt_oss import _Reader

if TYPE_CHECKING:  # a runtime import would be circular: weights/__init__ imports this module
    from . import ExpertWeights

GROUP = 32
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def to_pack_quantized(data: torch.Tensor) -> torch.Tensor:
    """Canonical int4 codes uint8 [..., K/2] (two's complement, low nibble = even element) ->
    compressed-tensors weight_packed int32 [..., K/8] (offset binary: code + 8 mod 16 flips bit 3
    of each nibble; element 8j+i in bits 4i..4i+3 of word j). Inverse: `from_pack_quantized`."""
    if data.dtype != torch.uint8 or data.dim() < 1 or data.shape[-1] % 4:
        raise ValueError(f"data: expected uint8 [..., K/2] with K a multiple of 8, got {data.dtype} "
                         f"{list(data.shape)}")
    _little_endian()
    return (data.contiguous() ^ 0x88).view(torch.int32)


def from_pack_quantized(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors weight_packed int32 [..., K/8] -> canonical uint8 [..., K/2] (inverse of
    `to_pack_quantized`)."""
    if packed.dtype != torch.int32 or packed.dim() < 1:
        raise ValueError(f"packed: expected int32 [..., K/8], got {packed.dtype} {list(packed.shape)}")
    _little_endian()
    return packed.contiguous().view(torch.uint8) ^ 0x88


def _little_endian():
    if sys.byteorder != "little":  # a word's bytes would be in the other order
        raise ValueError("compressed-tensors packing: the int32 <-> bytes view assumes a little-endian machine")


class _Tensors(_Reader):
    """The GPT-OSS reader, plus tensors of any dtype and the names under a prefix."""

    def raw(self, name: str, expected: str) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"checkpoint: tensor {name} is missing (expected {expected})")
        with self._open(self.where[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # data past the end of a truncated file, say
                raise ValueError(f"checkpoint: tensor {name} in {self.where[name]} cannot be read "
                                 f"({type(e).__name__}: {e})") from None

    def bad(self, name: str, expected: str, t: torch.Tensor) -> ValueError:
        return ValueError(f"checkpoint: tensor {name} in {self.where[name]}: expected {expected}, "
                          f"got {t.dtype} of shape {list(t.shape)}")

    def experts(self, prefix: str, first: str) -> int:
        """The number of experts under prefix: ids 0..E-1 of `{prefix}.{e}.{first}`, all present."""
        pat = re.compile(re.escape(prefix) + r"\.(\d+)\." + re.escape(first) + "$")
        ids = sorted(int(m.group(1)) for k in self.where if (m := pat.match(k)))
        if not ids:
            raise ValueError(f"checkpoint: no tensors {prefix}.<expert>.{first} (is {prefix!r} the experts' "
                             f"module name in this checkpoint?)")
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))
        if missing:
            raise ValueError(f"checkpoint: tensor {prefix}.{missing[0]}.{first} is missing (experts "
                             f"{ids[0]}..{ids[-1]} are present)")
        return len(ids)


def _scales_bf16(r: _Tensors, name: str, s: torch.Tensor) -> torch.Tensor:
    """Scales as bf16 (qmoe's int4 scale dtype); fp16/fp32 only when bf16 holds them exactly."""
    if s.dtype == torch.bfloat16:
        return s
    if s.dtype in (torch.float16, torch.float32):
        b = s.to(torch.bfloat16)
        if torch.equal(b.to(s.dtype), s):
            return b
        raise ValueError(f"checkpoint: tensor {name} in {r.where[name]}: {s.dtype} scales that bf16 cannot hold "
                         f"exactly; qmoe's int4 keeps bf16 scales and will not round them")
    raise r.bad(name, "bf16 scales", s)


def _read_matrix(r: _Tensors, p: str):
    """One projection -> (codes uint8 [N, K/2], scales bf16 [N, K/32], (N, K))."""
    if p + ".weight_zero_point" in r.where:
        raise ValueError(f"checkpoint: tensor {p}.weight_zero_point: asymmetric int4 (a zero point) is not "
                         f"qmoe's int4, which is symmetric")
    shape_t = r.raw(p + ".weight_shape", "an integer tensor [2] = [N, K]")
    if shape_t.dtype.is_floating_point or shape_t.dtype == torch.bool or shape_t.numel() != 2:
        raise r.bad(p + ".weight_shape", "an integer tensor [2] = [N, K]", shape_t)
    N, K = (int(v) for v in shape_t.reshape(-1).tolist())
    if N < 1 or K < GROUP or K % GROUP:
        raise ValueError(f"checkpoint: tensor {p}.weight_shape in {r.where[p + '.weight_shape']}: [N, K] = "
                         f"[{N}, {K}], expected K a multiple of {GROUP}")
    packed = r.raw(p + ".weight_packed", f"int32 of shape [{N}, {K // 8}]")
    if packed.dtype != torch.int32 or tuple(packed.shape) != (N, K // 8):
        raise r.bad(p + ".weight_packed", f"int32 of shape [{N}, {K // 8}] (weight_shape [{N}, {K}], 8 codes "
                                          f"per word)", packed)
    s = r.raw(p + ".weight_scale", f"bf16 of shape [{N}, {K // GROUP}]")
    if s.dim() != 2 or s.shape[0] != N or s.shape[1] < 1 or K % s.shape[1]:
        raise r.bad(p + ".weight_scale", f"scales of shape [{N}, {K // GROUP}]", s)
    if s.shape[1] != K // GROUP:
        raise ValueError(f"checkpoint: tensor {p}.weight_scale in {r.where[p + '.weight_scale']}: group size "
                         f"{K // s.shape[1]} (shape {list(s.shape)} for K = {K}); qmoe's int4 is group {GROUP}")
    return from_pack_quantized(packed), _scales_bf16(r, p + ".weight_scale", s), (N, K)


def load_compressed_tensors(path, prefix: str) -> "ExpertWeights":
    """Read one MoE block's experts from a compressed-tensors pack-quantized int4 checkpoint.

    path: a .safetensors file or a folder (with model.safetensors.index.json or not);
    prefix: the experts' module name in the checkpoint, e.g. "model.layers.3.mlp.experts".
    Returns an int4 ExpertWeights (w13 [E, 2I, H] rows gate then up, w2 [E, H, I], no biases) on the
    CPU. Malformed or missing tensors: ValueError naming the tensor (and its file).
    """
    from . import ExpertWeights

    r = _open_experts(path, prefix)
    E = r.experts(prefix, "gate_proj.weight_packed")
    gate, up, down = [], [], []
    for e in range(E):
        g, u, d = (_read_matrix(r, f"{prefix}.{e}.{proj}") for proj in PROJECTIONS)
        (I, H), (Iu, Hu), (Hd, Id) = g[2], u[2], d[2]
        _check_one_expert(prefix, e, (I, H), (Iu, Hu), (Hd, Id))
        if e and (I, H) != gate[0][2]:
            raise ValueError(f"checkpoint: tensor {prefix}.{e}.gate_proj.weight_shape: [{I}, {H}], expert 0 has "
                             f"{list(gate[0][2])}")
        gate.append(g), up.append(u), down.append(d)
    I, H = gate[0][2]
    w13 = QuantizedTensor("int4", (E, 2 * I, H), torch.stack([torch.cat((g[0], u[0])) for g, u in zip(gate, up)]),
                          torch.stack([torch.cat((g[1], u[1])) for g, u in zip(gate, up)]))
    w2 = QuantizedTensor("int4", (E, H, I), torch.stack([d[0] for d in down]), torch.stack([d[1] for d in down]))
    return ExpertWeights(w13, w2)


def save_compressed_tensors(path, layers) -> None:
    """Write experts in the compressed-tensors pack-quantized int4 layout (inverse of
    `load_compressed_tensors`; for tests and for handing qmoe-quantized weights to engines that read
    this layout).

    path: a .safetensors file (one file) or a folder (written as model.safetensors);
    layers: {prefix: int4 ExpertWeights without biases}, prefix as in load_compressed_tensors.
    weight_shape is stored as int64.
    """
    tensors = {}
    for prefix, w in _checked_layers(layers, "int4", "compressed-tensors pack-quantized"):
        I, H = w.intermediate_size, w.hidden_size
        for e in range(w.num_experts):
            mats = {"gate_proj": (w.w13.data[e, :I], w.w13.scales[e, :I], (I, H)),
                    "up_proj": (w.w13.data[e, I:], w.w13.scales[e, I:], (I, H)),
                    "down_proj": (w.w2.data[e], w.w2.scales[e], (H, I))}
            for proj, (data, scales, shape) in mats.items():
                p = f"{prefix}.{e}.{proj}"
                tensors[p + ".weight_packed"] = to_pack_quantized(data.cpu())
                tensors[p + ".weight_scale"] = scales.cpu().clone()
                tensors[p + ".weight_shape"] = torch.tensor(shape, dtype=torch.int64)
    _save_safetensors(tensors, path)


def _open_experts(path, prefix) -> _Tensors:
    """The checkpoint at `path` opened for reading the experts under `prefix` (checked to be a module name)."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix: expected the experts' module name (e.g. 'model.layers.3.mlp.experts'), "
                         f"got {prefix!r}")
    return _Tensors(os.fspath(path))


def _check_one_expert(prefix: str, e: int, gate, up, down) -> None:
    """gate, up: [I, H] and down: [H, I] (logical shapes) must make one expert; a clear ValueError otherwise."""
    (I, H), (Iu, Hu), (Hd, Id) = gate, up, down
    if (Iu, Hu) != (I, H) or (Hd, Id) != (H, I):
        raise ValueError(f"checkpoint: expert {e} of {prefix}: gate_proj [{I}, {H}], up_proj [{Iu}, {Hu}] and "
                         f"down_proj [{Hd}, {Id}] do not make one expert (expected [I, H], [I, H], [H, I])")


def _checked_layers(layers, fmt: str, layout: str):
    """The (prefix, ExpertWeights) pairs of a save_* `layers` argument, each checked to be `fmt`
    weights without biases (the only kind `layout` holds); a clear ValueError otherwise."""
    from . import ExpertWeights

    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"layers: expected {{prefix: ExpertWeights}}, got {type(layers).__name__}")
    for prefix, w in layers.items():
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"layers: keys must be the experts' module names, got {prefix!r}")
        if not isinstance(w, ExpertWeights) or w.format != fmt or w.has_bias:
            got = f"{w.format} weights{' with biases' if w.has_bias else ''}" if isinstance(w, ExpertWeights) \
                else type(w).__name__
            raise ValueError(f"layers[{prefix!r}]: {layout} holds {fmt} ExpertWeights without biases, got {got}")
    return list(layers.items())


def _save_safetensors(tensors: dict, path) -> None:
    """Write `tensors` to `path`: a .safetensors file, or a folder (created; written as model.safetensors)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "model.safetensors")
    save_file(tensors, path)


__all__ = ["GROUP", "from_pack_quantized", "load_compressed_tensors", "save_compressed_tensors",
           "to_pack_quantized"]
