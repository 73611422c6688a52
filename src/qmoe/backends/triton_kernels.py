"""The `triton_kernels` backend: OpenAI's triton_kernels MoE (`matmul_ogs`), MXFP4 weights with
bf16 activations (W4A16), run the way vLLM 0.33 runs it on SM90 (Hopper) for GPT-OSS.

It is the yardstick qmoe's own kernels are measured against, so it prepares from the same
canonical bytes (no requantization) into the very tensors vLLM's MXFP4 path feeds the kernel,
and its forward makes vLLM's launches (`OAITritonExperts.apply`: routing metadata from the
given ids and weights, one grouped GEMM with the fused SwiGLU, one with the top-k sum).

Where it comes from: an installed top-level `triton_kernels` package, else the copy vLLM
vendors, `vllm.third_party.triton_kernels`, registered as sys.modules["triton_kernels"] as
vLLM does (its files import `triton_kernels.*` absolutely). It is imported only when the
backend is asked about, never when qmoe is imported.

API generations (found by probing features, all in `_probe`):
  "matmul_ogs"  release/3.5.x, the copy vLLM 0.33 vendors: `matmul_ogs` + `RoutingData` from
                `routing_from_bitmatrix`; the w2 GEMM scatters and sums the k experts itself.
  "matmul"      3.8 and later: `matmul` + `RaggedTensorMetadata`; no in-kernel top-k sum, so
                the k rows of a token are added with index_add, as vLLM 0.33 does there.
  The 3.6 releases (`matmul_ogs` with SparseMatrix routing) are refused with the reason.

Layout made by `prepare` (all on the weights' device; Ip = intermediate size rounded up to 64,
vLLM's rule for this backend on CUDA; G(K) = K/32 scale groups rounded up to 4, vLLM's SM90
workaround of triton issue 47303):
  w13: triton_kernels Tensor, logical [E, H, 2Ip] FP4 (per expert a [K, N] matrix), N ordered
       gate/up interleaved (column 2j = gate j, 2j+1 = up j, as the GPT-OSS checkpoint and the
       fused swiglu have it), in triton_kernels' HopperMXValueLayout (mx_axis = the K axis).
       Made from the canonical [E, 2I, H/2] bytes by `to_kernel_order` (interleave, zero rows
       up to 2Ip, transpose to [E, H/2, 2Ip]) and then triton_kernels' own `convert_layout`.
  s13: E8M0 bytes, logical [E, G(H), 2Ip] (groups zero-padded), in HopperMXScaleLayout
       (mx_axis = the group axis, num_warps 8), from the canonical [E, 2I, H/32] the same way.
  w2, s2: from [E, H, I/2] / [E, H, I/32] likewise, K zero-padded to Ip; not interleaved.
  b13: fp32 [E, 2Ip] interleaved, zero-padded; b2: fp32 [E, H]; None where the weights have none.
Zero codes in padded rows and columns contribute exactly 0. `from_kernel_order` is the inverse
of qmoe's part; triton_kernels' layouts carry their own inverses (`unswizzle_data`).

The kernels need hidden sizes that are multiples of 64 (qmoe does not pad H: vLLM does not
either, GPT-OSS has 2880) and, on release/3.5.x, a power-of-two top_k (vLLM patches the
routing kernel for DeepSeek-V4's 6; qmoe does not).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from types import ModuleType

import torch
import triton

from ..spec import MoESpec
from ..weights import ExpertWeights, deinterleave_gate_up, interleave_gate_up
from ..kernels.peers import pack_bitmatrix, unpack_bitmatrix  # noqa: F401  (unpack: the inverse, for tests)
from .base import Backend, Prepared, Support, cuda_capability, finish_output, output_buffer, warm_up_ids

INTERMEDIATE_ALIGN = 64   # vLLM rounds the intermediate size up to 64 for this backend on CUDA
HIDDEN_ALIGN = 64         # HopperMXValueLayout tiles K in 64 values; vLLM never pads H here
SCALE_GROUP_ALIGN = 4     # vLLM pads the scale K groups to a multiple of 4 on SM90 (triton #47303)
SCALE_NUM_WARPS = 8       # vLLM's num_warps for make_default_matmul_mxfp4_w_scale_layout
VENDORED = "vllm.third_party.triton_kernels"
INSTALL_HINT = ("triton_kernels is not on PyPI: `pip install vllm` (qmoe then uses the copy vLLM vendors, "
                "vllm.third_party.triton_kernels), or extract vllm/third_party/triton_kernels from a vllm "
                "wheel into a folder on PYTHONPATH as a top-level `triton_kernels` package, or install "
                "python/triton_kernels from the Triton repository")


class TritonKernelsBackend(Backend):
    """OpenAI triton_kernels' matmul_ogs MoE on SM90 with MXFP4 weights and bf16 activations,
    as vLLM 0.33 runs it (layout: see the module docstring).

    Activation: triton_kernels' swiglu computes g * sigmoid(alpha * g) * (u + 1) with
    g = min(gate, limit) and u = clamp(up, -limit, limit), i.e. qmoe's SwiGLU with beta = 1;
    any alpha and limit run, limit=None as limit = float32 max (which clamps nothing finite).
    Routing weights are rounded to bf16 on release/3.5.x, as vLLM's make_routing_data does
    (the "matmul" generation keeps them in fp32, as vLLM does there).
    """

    name = "triton_kernels"
    formats = ("mxfp4",)
    capturable = True  # routing metadata and both GEMMs stay on the GPU: no host synchronization
    tunable = False
    first_use = ("Triton JIT-compiles triton_kernels' routing and matmul kernels: prepare runs one warm-up "
                 "forward (M = 1); a token count in a new block_m bucket compiles once more on its first call")

    def format_hint(self, fmt: str) -> str:
        return " (nvfp4 and int4 W4A16: triton, marlin or humming)"

    def _supports(self, spec: MoESpec, fmt: str, device: torch.device) -> Support:
        act = spec.activation
        if act.beta != 1.0:
            return Support(False, f"triton_kernels' fused swiglu computes (up + 1) * gate * sigmoid(alpha * gate): "
                                  f"beta is fixed at 1, this spec has beta = {act.beta:g} (use triton or reference)")
        cap = device_capability(device)
        if cap is None:
            return Support(False, f"needs a CUDA GPU (SM90); device {device} is not one or no GPU is visible")
        if cap != (9, 0):
            return Support(False, f"qmoe prepares triton_kernels' Hopper MXFP4 layouts, which need SM90; "
                                  f"this GPU is SM{cap[0]}{cap[1]}")
        api, why = load()
        if api is None:
            return Support(False, why)
        if spec.hidden_size % HIDDEN_ALIGN:
            return Support(False, f"hidden_size {spec.hidden_size} is not a multiple of {HIDDEN_ALIGN}, which "
                                  f"triton_kernels' Hopper value layout tiles (vLLM runs it at 2880)")
        if api.pow2_top_k and spec.top_k & (spec.top_k - 1):
            return Support(False, f"top_k {spec.top_k} is not a power of two, which the routing kernel of "
                                  f"triton_kernels {api.generation} needs (vLLM patches it; qmoe does not)")
        unchecked = ("; this generation's SM90 path follows its API and vLLM 0.33's calls but is not yet "
                     "checked on a GPU by qmoe (qualify it with `qmoe check`)") if api.generation == "matmul" else ""
        return Support(True, f"triton_kernels ({api.generation} API, {api.origin}): MXFP4 weights, bf16 "
                             f"activations, SM90 Hopper layouts{unchecked}")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        api, _ = load()
        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        Ip = triton.cdiv(I, INTERMEDIATE_ALIGN) * INTERMEDIATE_ALIGN
        pad_groups = SCALE_GROUP_ALIGN if api.pad_scale_groups else 1
        api.constrain_split_k()  # vLLM: split_k=1 on SM90 (a process-wide triton_kernels setting)
        w13, s13 = to_kernel_order(weights.w13.data, weights.w13.scales, 2 * Ip, H, gated=True,
                                   group_align=pad_groups)
        w2, s2 = to_kernel_order(weights.w2.data, weights.w2.scales, H, Ip, gated=False, group_align=pad_groups)
        w13, s13 = api.value_layout(w13), api.scale_layout(s13)
        w2, s2 = api.value_layout(w2), api.scale_layout(s2)
        t = {"w13": w13.storage.data, "s13": s13.storage.data, "w2": w2.storage.data, "s2": s2.storage.data}
        if weights.b13 is not None:
            t["b13"] = interleave_gate_up(_pad_halves(weights.b13.unsqueeze(-1), Ip)).squeeze(-1).contiguous()
        if weights.b2 is not None:
            t["b2"] = weights.b2.contiguous()
        act = spec.activation
        limit = torch.finfo(torch.float32).max if act.limit is None else float(act.limit)
        meta = {"api": api, "generation": api.generation, "origin": api.origin,
                "hidden_size": H, "intermediate_padded": Ip, "num_experts": E, "top_k": spec.top_k,
                "w13": w13, "w2": w2,
                "precision13": api.precision(s13), "precision2": api.precision(s2),
                "activation": api.swiglu(float(act.alpha), limit)}
        prepared = Prepared(self.name, spec, weights.format, weights.device, t, meta)
        _warm_up(self, prepared)
        return prepared

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        """x: [M, H] bf16 (fp16 / fp32 are rounded to bf16: the kernels compute in bf16);
        topk_ids: [M, k] int (-1 = no expert); topk_weights: [M, k] float;
        out: [M, H] float, contiguous (written in place); shared_output: [M, H] or None (added).
        Returns out."""
        self.check_prepared(prepared)
        M = x.shape[0]
        if M == 0:
            return out
        meta = prepared.meta
        xb = x.to(torch.bfloat16).contiguous()
        buf = output_buffer(out, meta["hidden_size"])
        if meta["generation"] == "matmul_ogs":
            _experts_matmul_ogs(prepared, xb, topk_ids, topk_weights, buf)
        else:
            _experts_matmul(prepared, xb, topk_ids, topk_weights, buf)
        return finish_output(out, buf, shared_output)


BACKEND = TritonKernelsBackend()


def device_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None without one. Tests replace this function to run
    the backend's logic on CPU tensors; nothing else should."""
    return cuda_capability(device)


# --- the two forwards -----------------------------------------------------------------------------
def _experts_matmul_ogs(prepared, x, topk_ids, topk_weights, out):
    """release/3.5.x, as vLLM's make_routing_data + triton_kernel_fused_experts: x [M, H] bf16,
    out [M, H] bf16 contiguous (written)."""
    meta, t, api = prepared.meta, prepared.tensors, prepared.meta["api"]
    M, k, E = x.shape[0], meta["top_k"], meta["num_experts"]
    ids = topk_ids.to(torch.int16).contiguous()
    weights = topk_weights.to(torch.bfloat16).contiguous()  # vLLM rounds the routing weights to bf16
    routing, gather, scatter = api.routing(ids, weights, E)
    inter = torch.empty(1, M * k, meta["intermediate_padded"], dtype=torch.bfloat16, device=x.device)
    api.matmul(x=x, w=meta["w13"], bias=t.get("b13"), routing_data=routing, gather_indx=gather,
               precision_config=meta["precision13"], fused_activation=meta["activation"], y=inter)
    if k == 1:
        # one expert per token: the GEMM scatters its rows straight into `out` and never writes
        # the rows of tokens whose only id is -1, so those must read 0 beforehand
        out.zero_()
    api.matmul(x=inter.view(M * k, -1), w=meta["w2"], bias=t.get("b2"), routing_data=routing,
               scatter_indx=scatter, precision_config=meta["precision2"], gammas=routing.gate_scal,
               y=out.view(1, M, -1))


def _experts_matmul(prepared, x, topk_ids, topk_weights, out):
    """3.8 and later, as vLLM 0.33's path for that generation: a stable sort by expert (slots of
    id -1 go to expert 0 with weight 0), two ragged GEMMs, an index_add of the k rows in fp32.
    x [M, H] bf16, out [M, H] bf16 (written)."""
    meta, t, api = prepared.meta, prepared.tensors, prepared.meta["api"]
    M, k, E = x.shape[0], meta["top_k"], meta["num_experts"]
    flat_ids = topk_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat_ids.clamp(min=0), stable=True)
    edges = torch.searchsorted(sorted_ids, torch.arange(E + 1, dtype=sorted_ids.dtype, device=x.device),
                               out_int32=True)
    ragged = api.ragged_metadata(edges[1:] - edges[:-1], M * k)
    token_of_row = (order // k).to(torch.int32)
    gammas = (topk_weights.reshape(-1).float() * (flat_ids >= 0))[order]
    inter = api.matmul(a=x, b=meta["w13"], bias=t.get("b13"), a_ragged_metadata=ragged,
                       gather_indx=token_of_row, precision_config=meta["precision13"],
                       fused_activation=meta["activation"])
    y = api.matmul(a=inter.reshape(M * k, -1), b=meta["w2"], bias=t.get("b2"), a_ragged_metadata=ragged,
                   precision_config=meta["precision2"], gammas=gammas)
    acc = torch.zeros(M, out.shape[1], dtype=torch.float32, device=x.device)
    acc.index_add_(0, token_of_row.long(), y.reshape(M * k, -1).float())
    out.copy_(acc)


def _warm_up(backend: TritonKernelsBackend, prepared: Prepared) -> None:
    """One forward at M = 1, so the first JIT compilation happens in prepare, not inside a timed
    or captured call."""
    spec, dev = prepared.spec, prepared.device
    x = torch.zeros(1, spec.hidden_size, dtype=torch.bfloat16, device=dev)
    ids = warm_up_ids(spec, dev)
    w = torch.full((1, spec.top_k), 1.0 / spec.top_k, device=dev)
    backend.forward(prepared, x, ids, w, torch.empty_like(x))


# --- qmoe's part of the layout (each step next to its inverse) -------------------------------------
def _pad_halves(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[E, 2I, X] [gate; up] -> [E, 2*rows, X]: each half zero-padded to `rows` rows."""
    i = t.shape[1] // 2
    pad = (0, 0, 0, rows - i)
    return torch.cat((torch.nn.functional.pad(t[:, :i], pad), torch.nn.functional.pad(t[:, i:], pad)), dim=1)


def to_kernel_order(data: torch.Tensor, scales: torch.Tensor, rows: int, k: int, gated: bool,
                    group_align: int = SCALE_GROUP_ALIGN):
    """qmoe's part of the prepared layout of one canonical MXFP4 weight.

    data: [E, N, K/2] uint8 (low nibble = even k); scales: [E, N, K/32] uint8 E8M0;
    rows: padded N (for gated w13: 2 * padded I, each half padded); k: padded K (>= K).
    gated: [gate; up] rows are interleaved (gate0, up0, ...) after padding.
    Returns (data [E, k/2, rows] uint8, scales [E, G, rows] uint8), both transposed views of
    contiguous [E, rows, ...] tensors (K-major, as vLLM's _swizzle_mxfp4 hands them to
    triton_kernels' layouts), with G = k/32 rounded up to `group_align`. Padding is zeros.
    """
    half_k = data.shape[2]
    groups = triton.cdiv(k // 32, group_align) * group_align
    if gated:
        data, scales = _pad_halves(data, rows // 2), _pad_halves(scales, rows // 2)
        data, scales = interleave_gate_up(data), interleave_gate_up(scales)
    data = torch.nn.functional.pad(data, (0, k // 2 - half_k, 0, rows - data.shape[1])).contiguous()
    scales = torch.nn.functional.pad(scales, (0, groups - scales.shape[2], 0, rows - scales.shape[1])).contiguous()
    return data.transpose(-2, -1), scales.transpose(-2, -1)


def from_kernel_order(data: torch.Tensor, scales: torch.Tensor, n: int, k: int, gated: bool):
    """Inverse of `to_kernel_order`: (data [E, k'/2, rows], scales [E, G, rows]) -> the
    canonical (data [E, n, k/2], scales [E, n, k/32]) with the padding dropped."""
    data, scales = data.transpose(-2, -1), scales.transpose(-2, -1)
    if gated:
        data, scales = deinterleave_gate_up(data), deinterleave_gate_up(scales)
        half = data.shape[1] // 2
        keep = torch.cat((torch.arange(n // 2), half + torch.arange(n // 2))).to(data.device)
        data, scales = data[:, keep], scales[:, keep]
    return data[:, :n, :k // 2].contiguous(), scales[:, :n, :k // 32].contiguous()


# --- the installed package: every probe of its API generation lives here ---------------------------
class Api:
    """What the loaded triton_kernels offers, found by probing; the adapter calls it only through
    these methods and attributes.

    generation: "matmul_ogs" (release/3.5.x) | "matmul" (3.8+); origin: where it was loaded from;
    pow2_top_k: the routing kernel needs a power-of-two top_k; pad_scale_groups: vLLM's
    multiple-of-4 scale-group padding applies.
    """

    def __init__(self, module: ModuleType, origin: str, generation: str, parts: dict):
        self.module, self.origin, self.generation = module, origin, generation
        self._p = parts
        self.pow2_top_k = generation == "matmul_ogs"
        # vLLM pads the scale K groups to a multiple of 4 on SM90 for the 3.5/3.6 kernels ("Patches
        # #47303 ... remove once we upgrade to Triton 3.8.0+ kernels"). The later generation infers
        # the block size from the shapes (K / scale groups) unless PrecisionConfig takes
        # b_microblock_size, so there they are padded only when that size is passed explicitly.
        self.pad_scale_groups = generation == "matmul_ogs" or parts["microblock"]

    # calls, with keyword arguments wherever the function has stable names
    def matmul(self, **kwargs):
        return self._p["matmul"](**kwargs)

    def constrain_split_k(self):
        self._p["update_opt_flags_constraints"](constraints={"split_k": 1})

    def swiglu(self, alpha: float, limit: float):
        """FusedActivation of triton_kernels' swiglu over interleaved columns (reduction_n = 2:
        moved from FusedActivation into FnSpecs after 3.5)."""
        p = self._p
        specs = {"name": "swiglu", "fn": p["swiglu_fn"], "fn_arg_names": ("alpha", "limit")}
        act = {"fn_args": (alpha, limit)}
        (act if p["reduction_n_on_activation"] else specs)["reduction_n"] = 2
        return p["FusedActivation"](specs=p["FnSpecs"](**specs), **act)

    def precision(self, scale):
        """PrecisionConfig holding the weight scales (`weight_scale` up to 3.6, `b_mx_scale` after)."""
        p = self._p
        kw = {p["scale_field"]: scale, "flex_ctx": p["FlexCtx"](rhs_data=p["InFlexData"]())}
        if p["microblock"]:
            kw["b_microblock_size"] = 32
        return p["PrecisionConfig"](**kw)

    def value_layout(self, data_t: torch.Tensor):
        """[E, K/2, N] uint8 K-major view -> triton_kernels Tensor [E, K, N] FP4 in HopperMXValueLayout
        (what make_default_matmul_mxfp4_w_layout returns on SM90)."""
        p = self._p
        t = p["wrap_torch_tensor"](torch_tensor=data_t, dtype=p["FP4"])
        if p["layout_style"] == "class":  # release/3.5.x: a class and its kwargs, shape given by convert_layout
            return self._convert(t, p["HopperMXValueLayout"], mx_axis=1)
        return self._convert(t, p["HopperMXValueLayout"](mx_axis=-2, mma_version=3))

    def scale_layout(self, scales_t: torch.Tensor):
        """[E, G, N] uint8 E8M0 view -> triton_kernels Tensor in HopperMXScaleLayout (num_warps 8)."""
        p = self._p
        t = p["wrap_torch_tensor"](torch_tensor=scales_t)
        if p["layout_style"] == "class":
            return self._convert(t, p["HopperMXScaleLayout"], mx_axis=1, num_warps=SCALE_NUM_WARPS)
        return self._convert(t, p["HopperMXScaleLayout"](mx_axis=-2, num_warps=SCALE_NUM_WARPS))

    def _convert(self, tensor, layout, **layout_kwargs):
        return self._p["convert_layout"](**{"tensor": tensor, self._p["layout_param"]: layout}, **layout_kwargs)

    def routing(self, ids: torch.Tensor, weights: torch.Tensor, num_experts: int):
        """release/3.5.x routing metadata from the given ids int16 [M, k] and weights bf16 [M, k]
        (vLLM's make_routing_data): a bitmatrix of the chosen experts, weights of id -1 set to -1,
        then routing_from_bitmatrix. Returns (RoutingData, GatherIndx, ScatterIndx)."""
        p = self._p
        M, k = ids.shape
        words = triton.cdiv(num_experts, 32)
        bits = torch.zeros(M, words, dtype=torch.uint32, device=ids.device)  # zeroed first, as vLLM does
        pack_bitmatrix(ids, bits)
        kw = {"storage": bits, "shape": [M, words * 32], "shape_max": [M, None]}
        if "scratchpad" in p["bitmatrix_params"]:
            kw["scratchpad"] = None
        bitmatrix = p["Bitmatrix"](**kw)
        weights = torch.where(ids == -1, -1.0, weights)  # matmul_ogs expects -1 weights on empty slots
        return p["routing_from_bitmatrix"](bitmatrix=bitmatrix, expt_scal=weights, expt_indx=ids,
                                           n_expts_tot=num_experts, n_expts_act=k)

    def ragged_metadata(self, counts: torch.Tensor, n_rows: int):
        """3.8+: RaggedTensorMetadata from tokens per expert int32 [E] (positional: the parameter
        names changed between releases, (batch_sizes, n_gates) -> (slice_sizes, n_total_rows))."""
        return self._p["make_ragged_tensor_metadata"](counts, n_rows)


_loaded: tuple = (None, None, None)  # (module, Api or None, reason)


def load() -> tuple[Api | None, str]:
    """(Api, "") for the importable triton_kernels, or (None, why not). Probes once per module object."""
    global _loaded
    module, origin, why = _import()
    if module is None:
        return None, why
    if _loaded[0] is not module:
        try:
            api, reason = _probe(module, origin)
        except Exception as e:  # a package that breaks while probed is a reason, never a crash
            api, reason = None, f"probing triton_kernels from {origin} failed: {type(e).__name__}: {e}"
        _loaded = (module, api, reason)
    return _loaded[1], _loaded[2]


def _import() -> tuple[ModuleType | None, str, str]:
    """The top-level triton_kernels, else vLLM's vendored copy registered under that name."""
    mod = sys.modules.get("triton_kernels")
    if mod is None:
        if _has_module("triton_kernels"):
            try:
                mod = importlib.import_module("triton_kernels")
            except Exception as e:
                return None, "", f"triton_kernels failed to import: {type(e).__name__}: {e}"
        elif _has_module(VENDORED):
            try:
                mod = importlib.import_module(VENDORED)
            except Exception as e:
                return None, "", f"{VENDORED} failed to import: {type(e).__name__}: {e}"
            sys.modules["triton_kernels"] = mod  # its files import triton_kernels.* absolutely
        else:
            return None, "", f"triton_kernels is not installed: {INSTALL_HINT}"
    where = os.path.dirname(getattr(mod, "__file__", None) or "") or "?"
    name = VENDORED if mod.__name__ == VENDORED else "triton_kernels"
    return mod, f"{name} at {where}", ""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # a missing or broken parent package (vllm) or spec
        return False


def _sub(name: str):
    """Submodule `triton_kernels.<name>`, None if missing or broken."""
    try:
        return importlib.import_module(f"triton_kernels.{name}")
    except Exception:
        return None


def _params(fn) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _fields(cls) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else _params(cls)


def _probe(module: ModuleType, origin: str) -> tuple[Api | None, str]:
    """Every fact qmoe relies on about the loaded triton_kernels, found by features."""
    found = f"triton_kernels from {origin}"
    mm_ogs, mm, routing = _sub("matmul_ogs"), _sub("matmul"), _sub("routing")
    has_ogs = mm_ogs is not None and hasattr(mm_ogs, "matmul_ogs")
    if has_ogs and routing is not None and hasattr(routing, "routing_from_bitmatrix"):
        generation, home, fn = "matmul_ogs", mm_ogs, mm_ogs.matmul_ogs
        call = ("x", "w", "bias", "routing_data", "gather_indx", "scatter_indx", "precision_config",
                "gammas", "y", "fused_activation")
        flags = _sub("matmul_ogs_details.opt_flags")
    elif mm is not None and hasattr(mm, "matmul"):
        generation, home, fn = "matmul", mm, mm.matmul
        call = ("a", "b", "bias", "a_ragged_metadata", "gather_indx", "precision_config", "gammas",
                "fused_activation")
        flags = _sub("matmul_details.opt_flags")
    elif has_ogs:
        return None, (f"{found} has matmul_ogs without routing.routing_from_bitmatrix (the 3.6 releases, "
                      f"SparseMatrix routing), an API generation qmoe does not drive; use the copy vLLM 0.33 "
                      f"vendors (release/3.5.x) or triton_kernels 3.8+ (matmul)")
    else:
        return None, f"{found} has neither matmul_ogs.matmul_ogs nor matmul.matmul (no MoE GEMM entry point)"

    def missing(what: str) -> tuple[None, str]:
        return None, f"{found} ({generation} API) lacks {what}"

    lacking = [p for p in call if p not in _params(fn)]
    if lacking:
        return missing(f"the {fn.__name__} parameter(s) {', '.join(lacking)}")
    parts = {"matmul": fn}
    for name in ("FnSpecs", "FusedActivation", "PrecisionConfig", "FlexCtx"):
        parts[name] = getattr(home, name, None)
        if parts[name] is None:
            return missing(f"{home.__name__}.{name}")
    tensor, numerics, swiglu = _sub("tensor"), _sub("numerics"), _sub("swiglu")
    layout = _sub("tensor_details.layout")
    for mod, attr in ((tensor, "wrap_torch_tensor"), (tensor, "convert_layout"), (tensor, "FP4"),
                      (numerics, "InFlexData"), (swiglu, "swiglu_fn"),
                      (flags, "update_opt_flags_constraints")):
        if mod is None or not hasattr(mod, attr):
            return missing(f"{'a submodule' if mod is None else mod.__name__} attribute {attr}")
        parts[attr] = getattr(mod, attr)
    if "constraints" not in _params(parts["update_opt_flags_constraints"]):
        return missing("update_opt_flags_constraints(constraints)")
    for kind in ("Value", "Scale"):  # renamed HopperAmpereMX*Layout in some releases
        cls = None if layout is None else (getattr(layout, f"HopperMX{kind}Layout", None)
                                           or getattr(layout, f"HopperAmpereMX{kind}Layout", None))
        if cls is None:
            return missing(f"tensor_details.layout.HopperMX{kind}Layout")
        parts[f"HopperMX{kind}Layout"] = cls
    # release/3.5.x layouts are classes built by convert_layout(tensor, cls, **kwargs) with the shape;
    # later ones are shape-free instances (mx_axis counted from the end) passed as they are
    parts["layout_style"] = "class" if "shape" in _params(parts["HopperMXValueLayout"]) else "instance"
    parts["layout_param"] = [p for p in inspect.signature(parts["convert_layout"]).parameters][1]
    fused, specs = _fields(parts["FusedActivation"]), _fields(parts["FnSpecs"])
    if not {"specs", "fn_args"} <= fused or not {"name", "fn", "fn_arg_names"} <= specs:
        return missing("FusedActivation(specs, fn_args) / FnSpecs(name, fn, fn_arg_names)")
    if "reduction_n" not in fused and "reduction_n" not in specs:
        return missing("a reduction_n of FusedActivation or FnSpecs (the 2:1 swiglu output)")
    parts["reduction_n_on_activation"] = "reduction_n" in fused
    pc = _fields(parts["PrecisionConfig"])
    scale_field = "weight_scale" if "weight_scale" in pc else "b_mx_scale" if "b_mx_scale" in pc else None
    if scale_field is None or "flex_ctx" not in pc:
        return missing("PrecisionConfig(weight_scale | b_mx_scale, flex_ctx)")
    parts["scale_field"], parts["microblock"] = scale_field, "b_microblock_size" in pc
    if generation == "matmul_ogs":
        parts["routing_from_bitmatrix"] = routing.routing_from_bitmatrix
        parts["Bitmatrix"] = getattr(tensor, "Bitmatrix", None)
        if parts["Bitmatrix"] is None:
            return missing("tensor.Bitmatrix")
        parts["bitmatrix_params"] = _params(parts["Bitmatrix"])
        lacking = [p for p in ("bitmatrix", "expt_scal", "expt_indx", "n_expts_tot", "n_expts_act")
                   if p not in _params(routing.routing_from_bitmatrix)]
        if lacking or not {"storage", "shape", "shape_max"} <= parts["bitmatrix_params"]:
            return missing("routing_from_bitmatrix(bitmatrix, expt_scal, expt_indx, n_expts_tot, n_expts_act) "
                           "and Bitmatrix(storage, shape, shape_max)")
    else:
        parts["make_ragged_tensor_metadata"] = getattr(tensor, "make_ragged_tensor_metadata", None)
        if parts["make_ragged_tensor_metadata"] is None:
            return missing("tensor.make_ragged_tensor_metadata")
    return Api(module, origin, generation, parts), ""


__all__ = ["BACKEND", "TritonKernelsBackend", "deinterleave_gate_up", "from_kernel_order", "interleave_gate_up",
           "load", "pack_bitmatrix", "to_kernel_order", "unpack_bitmatrix"]
