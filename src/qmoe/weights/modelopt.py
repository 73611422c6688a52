"""NVIDIA ModelOpt NVFP4 checkpoints (Qwen3-MoE, DeepSeek-V3/R1 "FP4" releases) <-> canonical nvfp4.

Per expert e of one MoE block, `prefix` = the experts' module name ("model.layers.3.mlp.experts"):
  {prefix}.{e}.gate_proj.weight          uint8 [I, H/2]           E2M1 codes, low nibble = even element
  {prefix}.{e}.gate_proj.weight_scale    float8_e4m3fn [I, H/16]  one scale per 16 elements
  {prefix}.{e}.gate_proj.weight_scale_2  fp32 [] (or [1])         per-matrix global scale:
                                                                  value = code * weight_scale * weight_scale_2
  {prefix}.{e}.gate_proj.input_scale     fp32                     activation scale (W4A4); not read
  {prefix}.{e}.up_proj.*                 as gate_proj
  {prefix}.{e}.down_proj.*               [H, I/2], [H, I/16], []
These are qmoe's nvfp4 bytes as they are (no conversion). qmoe's w13 has one global scale per
expert, so gate_proj and up_proj must share weight_scale_2 (ModelOpt exports fused gate/up that
way; vLLM takes the gate's and warns otherwise); different ones are refused by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..formats import QuantizedTensor
from .compressed_tensors import (
    PROJECTIONS,
    _check_one_expert,
    _checked_layers,
    _open_experts,
    _save_safetensors,
    _Tensors,
)

if TYPE_CHECKING:  # a runtime import would be circular: weights/__init__ imports this module
    from . import ExpertWeights

BLOCK = 16


def _read_matrix(r: _Tensors, p: str):
    """One projection -> (codes uint8 [N, K/2], scales e4m3 [N, K/16], global scale fp32 0-d)."""
    w = r.raw(p + ".weight", "uint8 [N, K/2] (two E2M1 codes per byte)")
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] % (BLOCK // 2):
        raise r.bad(p + ".weight", f"uint8 [N, K/2] with K a multiple of {BLOCK}", w)
    N, K = w.shape[0], 2 * w.shape[1]
    s = r.raw(p + ".weight_scale", f"float8_e4m3fn of shape [{N}, {K // BLOCK}]")
    if s.dtype != torch.float8_e4m3fn or tuple(s.shape) != (N, K // BLOCK):
        raise r.bad(p + ".weight_scale", f"float8_e4m3fn of shape [{N}, {K // BLOCK}] (one scale per "
                                         f"{BLOCK} of the {K} elements of a row)", s)
    g = r.raw(p + ".weight_scale_2", "a float32 scalar")
    if g.dtype != torch.float32 or g.numel() != 1:
        raise r.bad(p + ".weight_scale_2", "a float32 scalar (shape [] or [1])", g)
    g = g.reshape(())
    if not bool(torch.isfinite(g)) or float(g) <= 0:
        raise ValueError(f"checkpoint: tensor {p}.weight_scale_2 in {r.where[p + '.weight_scale_2']}: expected a "
                         f"finite positive global scale, got {float(g)}")
    return w, s, g, (N, K)


def load_modelopt_nvfp4(path, prefix: str) -> "ExpertWeights":
    """Read one MoE block's experts from a ModelOpt NVFP4 checkpoint.

    path: a .safetensors file or a folder (with model.safetensors.index.json or not);
    prefix: the experts' module name in the checkpoint, e.g. "model.layers.3.mlp.experts".
    Returns an nvfp4 ExpertWeights (w13 [E, 2I, H] rows gate then up with global scales [E], w2
    [E, H, I] with [E], no biases) on the CPU. Malformed or missing tensors, or gate and up with
    different global scales: ValueError naming the tensor (and its file).
    """
    from . import ExpertWeights

    r = _open_experts(path, prefix)
    E = r.experts(prefix, "gate_proj.weight")
    d13, s13, g13, d2, s2, g2 = [], [], [], [], [], []
    for e in range(E):
        g, u, d = (_read_matrix(r, f"{prefix}.{e}.{proj}") for proj in PROJECTIONS)
        (I, H), (Iu, Hu), (Hd, Id) = g[3], u[3], d[3]
        _check_one_expert(prefix, e, (I, H), (Iu, Hu), (Hd, Id))
        if e and (I, H) != (d13[0].shape[0] // 2, 2 * d13[0].shape[1]):
            raise ValueError(f"checkpoint: tensor {prefix}.{e}.gate_proj.weight: shape [{I}, {H // 2}] differs "
                             f"from expert 0's")
        if not torch.equal(g[2], u[2]):
            p = f"{prefix}.{e}"
            raise ValueError(f"checkpoint: tensors {p}.gate_proj.weight_scale_2 ({float(g[2])}) and "
                             f"{p}.up_proj.weight_scale_2 ({float(u[2])}) differ; qmoe's nvfp4 w13 has one global "
                             f"scale per expert (re-export with gate and up sharing it)")
        d13.append(torch.cat((g[0], u[0]))), s13.append(torch.cat((g[1], u[1]))), g13.append(g[2])
        d2.append(d[0]), s2.append(d[1]), g2.append(d[2])
    I, H = d13[0].shape[0] // 2, 2 * d13[0].shape[1]
    w13 = QuantizedTensor("nvfp4", (E, 2 * I, H), torch.stack(d13), torch.stack(s13), torch.stack(g13))
    w2 = QuantizedTensor("nvfp4", (E, H, I), torch.stack(d2), torch.stack(s2), torch.stack(g2))
    return ExpertWeights(w13, w2)


def save_modelopt_nvfp4(path, layers) -> None:
    """Write experts in the ModelOpt NVFP4 layout (inverse of `load_modelopt_nvfp4`).

    path: a .safetensors file (one file) or a folder (written as model.safetensors);
    layers: {prefix: nvfp4 ExpertWeights without biases}. weight_scale_2 is written as a 0-d
    fp32 tensor, the same for gate_proj and up_proj (w13's global scale); input_scale is not
    written (qmoe runs W4A16).
    """
    tensors = {}
    for prefix, w in _checked_layers(layers, "nvfp4", "ModelOpt NVFP4"):
        I = w.intermediate_size
        for e in range(w.num_experts):
            mats = {"gate_proj": (w.w13, slice(0, I), e), "up_proj": (w.w13, slice(I, 2 * I), e),
                    "down_proj": (w.w2, slice(None), e)}
            for proj, (q, rows, i) in mats.items():
                p = f"{prefix}.{e}.{proj}"
                tensors[p + ".weight"] = q.data[i, rows].cpu().clone()
                tensors[p + ".weight_scale"] = q.scales[i, rows].cpu().clone()
                tensors[p + ".weight_scale_2"] = q.global_scale[i].cpu().float().reshape(()).clone()
    _save_safetensors(tensors, path)


__all__ = ["BLOCK", "load_modelopt_nvfp4", "save_modelopt_nvfp4"]
