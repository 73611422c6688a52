"""humming_forward (the indexed MoE GEMM) and may_process_input (the activation kernel).

The indexed GEMM reads its routing as the kernel does: the interval of valid_shape_m in the
tuning table gives block_m; blocks 0 .. ceil(num_tokens_padded / block_m) - 1 are computed, each
with expert expert_ids[b] (which must be a real expert: the kernel would read out of bounds);
entry r of a block (sorted_ids read as uint32) reads input row r // top_k when that is below the
input rows, and writes output row r when that is below inputs rows * top_k. Other output rows
are left as they were. Tables are "compiled" on first use (recorded in STATE.compiles).
"""

from __future__ import annotations

import json
import re

import torch

from . import _layout
from ._fake import STATE
from .tune import get_heuristics_class

_GEMM_TABLES: dict = {}
_ACTIVATIONS: dict = {}


def humming_forward(config, inputs, weight, weight_scale=None, zero_point=None, bias=None, weight_scale_2=None,
                    outputs=None, input_scale=None, input_scale_2=None, sorted_ids=None, expert_ids=None,
                    num_tokens_padded=None, expert_layout=None, locks=None, top_k=1, valid_shape_m=0,
                    compute_config=None, tuning_config=None, hadamard_block_size=None, use_pdl=None):
    assert isinstance(compute_config, str) and json.loads(compute_config)["gemm_type"] == "indexed"
    assert isinstance(tuning_config, str), "fake humming: pass the interval table as a JSON string"
    table = json.loads(tuning_config)
    key = (config.to_str(), compute_config, tuning_config)
    if key not in _GEMM_TABLES:  # a whole table compiles at its first call
        _GEMM_TABLES[key] = True
        STATE.compiles.append(("gemm", key, len(table)))
    E, N, K = config.num_experts, config.shape_n - config.pad_shape_n, config.shape_k - config.pad_shape_k
    rows_in = inputs.shape[0]
    assert inputs.dtype == torch.bfloat16 and inputs.is_contiguous() and tuple(inputs.shape) == (rows_in, K), \
        f"fake humming: inputs {inputs.dtype} {list(inputs.shape)}, expected bf16 [rows, {K}]"
    rows_out = rows_in * top_k
    assert outputs is not None and outputs.dtype == torch.bfloat16 and outputs.is_contiguous() \
        and tuple(outputs.shape) == (rows_out, N), f"fake humming: outputs {list(outputs.shape)} != [{rows_out}, {N}]"
    for name, t in (("sorted_ids", sorted_ids), ("expert_ids", expert_ids), ("num_tokens_padded", num_tokens_padded),
                    ("locks", locks)):
        assert t is not None and t.dtype == torch.int32 and t.device == inputs.device and t.is_contiguous(), name
    assert input_scale is None and input_scale_2 is None and zero_point is None
    assert (bias is not None) == config.has_bias
    assert (weight_scale_2 is not None) == (config.weight_scale_2_type == "tensor")
    valid = valid_shape_m if valid_shape_m > 0 else rows_out
    bm = next(c["block_shape"][0] for lo, hi, c in table if lo < valid <= hi)
    W = _layout.dequantize(config, weight, weight_scale, weight_scale_2)[:, :N, :K]
    ntp = int(num_tokens_padded[0])
    nblocks = -(-ntp // bm)
    assert sorted_ids.numel() >= nblocks * bm and expert_ids.numel() >= nblocks, "routing arrays too short"
    ids = sorted_ids.to(torch.int64) & 0xFFFFFFFF
    x = inputs.float()
    for b in range(nblocks):
        e = int(expert_ids[b])
        assert 0 <= e < E, f"fake humming: block {b} names expert {e}: the kernel would read out of bounds"
        r = ids[b * bm:(b + 1) * bm]
        src = r // top_k
        ok = (src < rows_in) & (r < rows_out)
        if not bool(ok.any()):
            continue
        y = x[src[ok]] @ W[e].T
        if bias is not None:
            y = y + bias[e, :N].float()
        outputs[r[ok]] = y.to(torch.bfloat16)
    STATE.calls.append(("humming_forward", {"N": N, "K": K, "top_k": top_k, "valid_shape_m": valid_shape_m,
                                            "block_m": bm, "rows": rows_in}))
    return outputs


def _c_to_python(expr: str) -> str:
    """A C float expression over a, b with fminf / fmaxf / expf, float literals and parenthesized
    ternaries `(c ? x : y)` -> Python."""
    py = re.sub(r"((?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)f\b", r"\1", expr)
    py = py.replace("fminf", "_fmin").replace("fmaxf", "_fmax").replace("expf", "_exp")
    return _ternaries(py)


def _ternaries(s: str) -> str:
    """Rewrite every parenthesized C ternary `(c ? x : y)` as `_sel(c, x, y)`, innermost first."""
    while "?" in s:
        stack = []
        for close, ch in enumerate(s):
            if ch == "(":
                stack.append(close)
            elif ch == ")":
                open_ = stack.pop()
                inner = s[open_ + 1:close]
                depth, q, c = 0, None, None
                for i, x in enumerate(inner):
                    depth += (x == "(") - (x == ")")
                    if depth == 0 and x == "?" and q is None:
                        q = i
                    elif depth == 0 and x == ":" and q is not None:
                        c = i
                if q is not None and c is not None:
                    s = f"{s[:open_]}_sel({inner[:q]}, {inner[q + 1:c]}, {inner[c + 1:]}){s[close + 1:]}"
                    break
        else:
            raise ValueError(f"fake humming: a ternary outside parentheses in {s!r}")
    return s


def _evaluate(expr, a, b):
    f = (lambda v: torch.as_tensor(v, dtype=torch.float32))
    env = {"__builtins__": {}, "a": a, "b": b, "_exp": torch.exp,
           "_sel": lambda c, x, y: torch.where(c, f(x), f(y)),
           "_fmin": lambda x, y: torch.minimum(f(x), f(y)), "_fmax": lambda x, y: torch.maximum(f(x), f(y))}
    return eval(_c_to_python(expr), env)  # noqa: S307 (the fake's own tests control the input)


def may_process_input(config, inputs, *, outputs=None, group_scales=None, token_scales=None, activation_type="none",
                      activation_impl=None, hadamard_block_size=None, layout="normal", expert_tokens=None,
                      scatter_idx=None, num_valid_tokens=None, zero_invalid=False, m_major_scale=False,
                      use_pdl=None):
    assert layout == "normal" and scatter_idx is None and num_valid_tokens is None and token_scales is None
    assert activation_type in ("binary_split", "binary_interleaved") and activation_impl
    rows, width = inputs.shape
    assert inputs.dtype == torch.bfloat16 and inputs.is_contiguous() and width % 2 == 0
    h = width // 2
    assert outputs is not None and outputs.dtype == torch.bfloat16 and tuple(outputs.shape) == (rows, h)
    if use_pdl is None:
        use_pdl = get_heuristics_class(inputs.device).should_use_pdl_for_input(config, rows)
    key = (h, activation_type, activation_impl, bool(use_pdl))
    if key not in _ACTIVATIONS:
        _ACTIVATIONS[key] = True
        STATE.compiles.append(("activation", key, 1))
    v = inputs.float()
    if activation_type == "binary_split":
        a, b = v[:, :h], v[:, h:]
    else:
        a, b = v[:, 0::2], v[:, 1::2]
    outputs.copy_(_evaluate(activation_impl, a, b).to(torch.bfloat16))
    STATE.calls.append(("may_process_input", {"activation_type": activation_type, "use_pdl": bool(use_pdl),
                                              "rows": rows}))
    return outputs, None, None
