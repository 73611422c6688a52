"""vLLM's MoE op library (`_moe_C`), found and loaded without importing vLLM, and thin typed
wrappers of the ops qmoe calls.

Importing `vllm` takes seconds and fails on a torch it was not built for; its MoE op library is a
shared object that registers its ops with torch's dispatcher when loaded. `load()`:
  1. uses the ops if they are registered already (vLLM imported, or a fake op library in tests);
  2. else finds the `vllm` package directory with importlib.util.find_spec (nothing is imported;
     a namespace package holding only the library works: a folder `vllm/` with
     `_moe_C_stable_libtorch.abi3.so` on sys.path) and loads its `_moe_C*.so` with
     torch.ops.load_library, the stable-ABI build first;
  3. checks that each op qmoe calls exists with the arguments qmoe passes (vLLM 0.33's schemas).
It returns `(MoeOps, reason)` or `(None, reason)`; the reason says what to do. The result is
cached per (namespace, package): a library loads once per process.

The ops (vLLM 0.33, namespace `_moe_C`):
  moe_align_block_size(Tensor topk_ids, int num_experts, int block_size, Tensor! sorted_token_ids,
      Tensor! experts_ids, Tensor! num_tokens_post_pad, Tensor? maybe_expert_map,
      Tensor(a!)? scatter_idx=None) -> ()
  moe_wna16_marlin_gemm(Tensor! a, Tensor? c_or_none, Tensor! b_q_weight, Tensor? b_bias_or_none,
      Tensor! b_scales, Tensor? a_scales, Tensor? global_scale, Tensor? b_zeros_or_none,
      Tensor! workspace, Tensor sorted_token_ids, Tensor! expert_ids,
      Tensor! num_tokens_past_padded, Tensor! topk_weights, int moe_block_size, int top_k,
      bool mul_topk_weights, int b_type_id, int size_m, int size_n, int size_k,
      bool use_atomic_add, bool use_fp32_reduce, bool is_zp_float, int thread_k, int thread_n,
      int blocks_per_sm) -> Tensor
  moe_sum(Tensor input, Tensor! output, Tensor? topk_ids=None, Tensor? expert_map=None) -> ()
Earlier vLLM releases had other moe_wna16_marlin_gemm schemas (g_idx, perm, is_k_full, is_ep):
they are refused by name, never called with shifted arguments. Every call passes keywords.

Tests point the backends at a fake op library by registering it under a namespace of its own
and passing that namespace to `load` (the marlin backend's `ops_namespace` attribute).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import torch

NAMESPACE = "_moe_C"
"""The namespace vLLM registers its MoE ops under (TORCH_LIBRARY / STABLE_TORCH_LIBRARY name)."""
PACKAGE = "vllm"
"""The package whose directory holds the op library."""

# vLLM's ScalarType ids: the fields packed little-end first into one int64 (vllm/scalar_type.py,
# csrc/core/scalar_type.hpp): exponent bits (8), mantissa bits (8), signed (1), bias (32),
# finite values only (1), NaN representation (8).
NAN_NONE, NAN_IEEE_754, NAN_EXTD_RANGE_MAX_MIN = 0, 1, 2


def scalar_type_id(exponent: int, mantissa: int, signed: bool, bias: int = 0,
                   finite_values_only: bool = False, nan_repr: int = NAN_IEEE_754) -> int:
    """The id vLLM's ops take for a ScalarType (`b_type_id` of moe_wna16_marlin_gemm)."""
    value, offset = 0, 0
    for field, bits in ((exponent, 8), (mantissa, 8), (int(signed), 1), (bias, 32),
                        (int(finite_values_only), 1), (nan_repr, 8)):
        value |= (int(field) & ((1 << bits) - 1)) << offset
        offset += bits
    return value


UINT4 = scalar_type_id(0, 4, False)                   # 4-bit codes with a zero point (AWQ)
UINT4B8 = scalar_type_id(0, 4, False, bias=8)         # GPTQ int4: stored = value + 8
UINT8B128 = scalar_type_id(0, 8, False, bias=128)     # GPTQ int8
FLOAT8_E4M3FN = scalar_type_id(4, 3, True, 0, True, NAN_EXTD_RANGE_MAX_MIN)
FLOAT4_E2M1F = scalar_type_id(2, 1, True, 0, True, NAN_NONE)  # MXFP4 and NVFP4 (the scale dtype tells)

# The arguments qmoe passes, name -> type as torch prints it. Arguments missing here must have a
# default in the library's schema.
_T, _OT, _I, _B = "Tensor", "Optional[Tensor]", "int", "bool"
SCHEMAS = {
    "moe_align_block_size": {
        "topk_ids": _T, "num_experts": _I, "block_size": _I, "sorted_token_ids": _T,
        "experts_ids": _T, "num_tokens_post_pad": _T, "maybe_expert_map": _OT},
    "moe_wna16_marlin_gemm": {
        "a": _T, "c_or_none": _OT, "b_q_weight": _T, "b_bias_or_none": _OT, "b_scales": _T,
        "a_scales": _OT, "global_scale": _OT, "b_zeros_or_none": _OT, "workspace": _T,
        "sorted_token_ids": _T, "expert_ids": _T, "num_tokens_past_padded": _T, "topk_weights": _T,
        "moe_block_size": _I, "top_k": _I, "mul_topk_weights": _B, "b_type_id": _I, "size_m": _I,
        "size_n": _I, "size_k": _I, "use_atomic_add": _B, "use_fp32_reduce": _B, "is_zp_float": _B,
        "thread_k": _I, "thread_n": _I, "blocks_per_sm": _I},
    "moe_sum": {"input": _T, "output": _T, "topk_ids": _OT, "expert_map": _OT},
}
"""op name -> {argument: type} of vLLM 0.33 for every op qmoe calls."""


@dataclass(frozen=True)
class MoeOps:
    """vLLM's MoE ops, loaded and checked. namespace: where they are registered; library: the
    file that was loaded (None when the ops were registered already); version: vLLM's version
    when its package metadata says ("unknown" for a carried library)."""

    namespace: str
    library: str | None
    version: str

    def _op(self, name: str):
        return getattr(getattr(torch.ops, self.namespace), name)

    def moe_align_block_size(self, topk_ids: torch.Tensor, num_experts: int, block_size: int,
                             sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                             num_tokens_post_pad: torch.Tensor,
                             expert_map: torch.Tensor | None = None) -> None:
        """Groups the M*k routed slots by expert in blocks of block_size (writes the buffers).

        topk_ids: [M, k] int32, each in [0, num_experts) (an id of -1 is read as an index: pass
            ids in range and an expert_map that maps unwanted ones to -1);
        sorted_token_ids: int32 [align_sizes(...)[0]]: slot indices t*k + j grouped by expert,
            each expert's run padded to a multiple of block_size with the value M*k;
        expert_ids: int32 [align_sizes(...)[1]]: the expert of each block (-1 past the last);
        num_tokens_post_pad: int32 [1]: the padded slot count;
        expert_map: int32 [num_experts] or None: id -> local expert, -1 = skip the slot.
        """
        self._op("moe_align_block_size")(
            topk_ids=topk_ids, num_experts=num_experts, block_size=block_size,
            sorted_token_ids=sorted_token_ids, experts_ids=expert_ids,
            num_tokens_post_pad=num_tokens_post_pad, maybe_expert_map=expert_map)

    def moe_wna16_marlin_gemm(self, a: torch.Tensor, c: torch.Tensor | None, b_q_weight: torch.Tensor,
                              b_bias: torch.Tensor | None, b_scales: torch.Tensor,
                              global_scale: torch.Tensor | None, workspace: torch.Tensor,
                              sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                              num_tokens_past_padded: torch.Tensor, topk_weights: torch.Tensor, *,
                              moe_block_size: int, top_k: int, mul_topk_weights: bool, b_type_id: int,
                              size_m: int, size_n: int, size_k: int, a_scales: torch.Tensor | None = None,
                              b_zeros: torch.Tensor | None = None, use_atomic_add: bool = False,
                              use_fp32_reduce: bool = True, is_zp_float: bool = False, thread_k: int = -1,
                              thread_n: int = -1, blocks_per_sm: int = -1) -> torch.Tensor:
        """The grouped Marlin GEMM: c[r] = a[r // top_k] @ B[expert of r's block] (+ bias)
        (x topk_weights[r] when mul_topk_weights) for every slot r listed in sorted_token_ids.

        a: [size_m, size_k] bf16/fp16 contiguous; c: [size_m * top_k, size_n] of a's dtype or None
        (allocated); rows of c not listed are left as they were. b_q_weight: int32
        [E, size_k/16, size_n * 16 / pack] Marlin tiles; b_scales: [E, size_k/group, size_n]
        (dtype per b_type_id); b_bias: [E, size_n] of a's dtype or None; global_scale: fp32 [E]
        (NVFP4 only); workspace: int32 zeros [SMs * 4] (locks, reset by the kernel);
        topk_weights: fp32 [size_m * top_k] (flat). Returns c.
        """
        return self._op("moe_wna16_marlin_gemm")(
            a=a, c_or_none=c, b_q_weight=b_q_weight, b_bias_or_none=b_bias, b_scales=b_scales,
            a_scales=a_scales, global_scale=global_scale, b_zeros_or_none=b_zeros, workspace=workspace,
            sorted_token_ids=sorted_token_ids, expert_ids=expert_ids,
            num_tokens_past_padded=num_tokens_past_padded, topk_weights=topk_weights,
            moe_block_size=moe_block_size, top_k=top_k, mul_topk_weights=mul_topk_weights,
            b_type_id=b_type_id, size_m=size_m, size_n=size_n, size_k=size_k,
            use_atomic_add=use_atomic_add, use_fp32_reduce=use_fp32_reduce, is_zp_float=is_zp_float,
            thread_k=thread_k, thread_n=thread_n, blocks_per_sm=blocks_per_sm)

    def moe_sum(self, input: torch.Tensor, output: torch.Tensor, topk_ids: torch.Tensor | None = None,
                expert_map: torch.Tensor | None = None) -> None:
        """output[t] = sum over j of input[t, j] (in fp32), skipping slot j when
        expert_map[topk_ids[t, j]] == -1 (with both given).

        input: [M, k, H]; output: [M, H] of input's dtype; topk_ids: [M, k] int32 or None;
        expert_map: int32 [num_experts] or None.
        """
        self._op("moe_sum")(input=input, output=output, topk_ids=topk_ids, expert_map=expert_map)


def align_sizes(num_slots: int, num_experts: int, block_size: int) -> tuple[int, int]:
    """(sorted_token_ids length, expert_ids length) for moe_align_block_size, as vLLM sizes them:
    every expert may pad its run by block_size - 1, and never more blocks than slots."""
    padded = num_slots + num_experts * (block_size - 1)
    if num_slots < num_experts:
        padded = min(num_slots * block_size, padded)
    return padded, -(-padded // block_size)


def _missing_ops(namespace: str) -> list:
    ns = getattr(torch.ops, namespace)
    missing = []
    for name in SCHEMAS:
        try:
            getattr(ns, name).default
        except (AttributeError, RuntimeError):
            missing.append(name)
    return missing


def schema_problem(namespace: str, name: str) -> str:
    """'' when op `name` in `namespace` takes the arguments qmoe passes, else what differs."""
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    have = {a.name: a for a in schema.arguments}
    problems = []
    for arg, typ in SCHEMAS[name].items():
        if arg not in have:
            problems.append(f"no argument {arg!r}")
        elif str(have[arg].type) != typ:
            problems.append(f"{arg!r} is {have[arg].type}, expected {typ}")
    extra = [a.name for a in schema.arguments if a.name not in SCHEMAS[name] and not a.has_default_value()]
    if extra:
        problems.append(f"new required argument(s) {', '.join(extra)}")
    return "; ".join(problems)


def find_libraries(package: str = PACKAGE) -> tuple[list, list]:
    """(paths of `_moe_C*.so` in the package's directories, the stable-ABI build first; the
    directories looked in, [] when the package is not installed). Never imports the package."""
    spec = importlib.util.find_spec(package)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted({p for d in dirs for p in glob.glob(os.path.join(d, "_moe_C*.so"))},
                   key=lambda p: ("stable_libtorch" not in os.path.basename(p), p))
    return found, dirs


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cause(e: BaseException) -> str:
    # torch.ops.load_library wraps ctypes' OSError (which names the missing dependency)
    inner = e.__cause__ or e
    return f"{type(inner).__name__}: {inner}"


_CACHE: dict = {}


def load(namespace: str = NAMESPACE, package: str = PACKAGE) -> tuple[MoeOps | None, str]:
    """(MoeOps, what was loaded) or (None, why not, in words a user can act on). Never raises."""
    key = (namespace, package)
    if key not in _CACHE:
        try:
            _CACHE[key] = _load(namespace, package)
        except Exception as e:  # a probe that breaks is a reason, never a crash
            _CACHE[key] = (None, f"loading vLLM's MoE ops failed: {type(e).__name__}: {e}")
    return _CACHE[key]


def _load(namespace: str, package: str) -> tuple[MoeOps | None, str]:
    library = None
    if _missing_ops(namespace):
        paths, dirs = find_libraries(package)
        errors = []
        for path in paths:
            try:
                torch.ops.load_library(path)
            except Exception as e:
                errors.append(f"{os.path.basename(path)}: {_cause(e)}")
                continue
            library = path
            if not _missing_ops(namespace):
                break
        missing = _missing_ops(namespace)
        if len(missing) == len(SCHEMAS) and library is None:  # nothing loaded, nothing registered
            if errors:
                return None, (f"vLLM's MoE op library failed to load ({'; '.join(errors)}); it needs the CUDA "
                              f"libraries and a torch compatible with the one it was built for "
                              f"(torch {torch.__version__} is here)")
            if dirs:
                return None, (f"no _moe_C*.so in the {package} package at {', '.join(dirs)} (a build without CUDA MoE "
                              f"ops?): install vLLM's CUDA wheel")
            return None, (f"{package} is not installed: pip install vllm (0.33), or put a folder {package}/ "
                          f"holding vLLM's _moe_C*.so library on PYTHONPATH")
        if missing:
            return None, (f"vLLM's MoE ops in namespace {namespace!r} ({library or 'registered before'}) lack "
                          f"{', '.join(missing)}; qmoe calls vLLM 0.33's ops: install vLLM 0.33")
    for name in SCHEMAS:
        problem = schema_problem(namespace, name)
        if problem:
            return None, (f"vLLM's {name} schema changed ({problem}); qmoe calls vLLM 0.33's ops: "
                          f"install vLLM 0.33")
    ops = MoeOps(namespace, library, _version(package))
    return ops, f"vLLM {ops.version} MoE ops from {library or 'the ops registered under ' + namespace}"


__all__ = ["FLOAT4_E2M1F", "FLOAT8_E4M3FN", "MoeOps", "NAMESPACE", "PACKAGE", "SCHEMAS", "UINT4", "UINT4B8",
           "UINT8B128", "align_sizes", "find_libraries", "load", "scalar_type_id", "schema_problem"]
