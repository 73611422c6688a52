"""The `humming` backend: humming-kernels' W4A16 MoE GEMMs, run the way vLLM 0.33 runs them
(`HummingIndexedExperts`: the "indexed" GEMM type; vLLM's preferred W4A16 MoE kernel on SM90).

A yardstick: it prepares from qmoe's canonical bytes (no requantization) and calls humming with
the tables vLLM builds, so its time is what vLLM gets. humming JIT-compiles CUDA with NVRTC; every
kernel the forward can pick is compiled inside `prepare`, never inside a timed or captured call.

Prepare, per matrix (w13: N = 2I, K = H; w2: N = H, K = I):
  1. canonical -> the checkpoint schema vLLM hands humming (`to_schema`, inverse `from_schema`):
       mxfp4  "mxfp4" (GPT-OSS:      weight uint8 [E, N, K/2] (low nibble = even k), weight_scale
              "gpt_oss_mxfp4")       uint8 E8M0 [E, N, K/32]
       int4   compressed-tensors     weight_packed int32 [E, N, K/8] (element 8j+i in bits 4i..4i+3
              "pack-quantized"       of word j, offset binary: code + 8), weight_scale bf16 [E, N, K/32]
       nvfp4  modelopt "nvfp4"       weight uint8 [E, N, K/2], weight_scale float8_e4m3fn
                                     [E, N, K/16], weight_scale_2 fp32 [E] (x = code * s * scale_2)
     plus bias bf16 [E, N] (humming takes biases in its output dtype). For the GPT-OSS SwiGLU
     (alpha 1.702, beta 1, limit 7: vLLM's SWIGLUOAI) the w13 rows and b13 are interleaved
     gate0, up0, gate1, ... as in the GPT-OSS checkpoint; for every other activation they stay
     [gate; up].
  2. humming's own conversion and transform, as vLLM calls them: schema.convert_humming (int4 in
     chunks of experts, byte-identical: `_Humming.convert`), then
     prepare_and_transform_humming_tensors(pad N to 256, K to 128, bf16) -> a LayerConfig and
     humming's kernel tensors (weight, weight_scale, weight_scale_2, bias, zero_point), stored in
     Prepared.tensors as "w13.weight", ...; their layout is humming's (version-specific).
  3. the interval table vLLM builds: get_heuristics_config(layer, use_f16_accum=False,
     use_batch_invariant=False, gemm_type="indexed") -> [(lo, hi, kernel config)] over M * top_k.
  4. warm-up: one forward at M = 1 compiles every kernel of both tables and the activation kernel
     (humming compiles a whole table at its first call).

Forward (M tokens, k experts each, rows = M * k; no host sync, CUDA-graph capturable):
  group the (token, slot) rows by expert in blocks of the w13 interval's block_m (qmoe's
  group_tokens) -> sorted_ids / expert_ids / num_tokens_padded; humming_forward(w13) -> [rows, 2I]
  bf16; humming's activation kernel (may_process_input, "binary_interleaved" or "binary_split",
  qmoe's SwiGLU as a C++ expression) -> [rows, I]; humming_forward(w2) (regrouped when the w2
  interval's block_m differs) -> [rows, H]; a weighted sum over each token's valid slots (+
  shared_output) -> out. A kernel's cubin loads into the CUDA context at its first launch: run
  a token count once eagerly before capturing it (as vLLM and qmoe's commands do).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats import QuantizedTensor
from ..kernels import sm_count
from ..kernels.peers import align, weighted_sum
from ..spec import MoESpec, SwiGLU
from ..weights import ExpertWeights, deinterleave_gate_up, interleave_gate_up
from ..weights.compressed_tensors import from_pack_quantized, to_pack_quantized
from .base import Backend, Prepared, Support, cuda_capability, warm_up_ids

INSTALL_HINT = "pip install 'qmoe[humming]' (humming-kernels >= 0.1.19)"
PAD_N, PAD_K = 256, 128
"""vLLM pads every humming layer's N to a multiple of 256 and K to a multiple of 128."""
GPT_OSS_SWIGLU = SwiGLU(alpha=1.702, beta=1.0, limit=7.0)
"""vLLM's SWIGLUOAI: run on the checkpoint's interleaved gate/up rows ("binary_interleaved")."""
COMPUTE_CONFIG = json.dumps({"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "indexed"})
"""vLLM's compute config for HummingIndexedExperts (VLLM_BATCH_INVARIANT and
VLLM_HUMMING_USE_F16_ACCUM at their defaults), as the JSON string it passes."""
SCHEMAS = {
    "mxfp4": {"quant_method": "mxfp4"},
    "int4": {"quant_method": "compressed-tensors", "format": "pack-quantized", "type": "int", "num_bits": 4,
             "strategy": "group", "group_size": 32, "symmetric": True},
    "nvfp4": {"quant_method": "modelopt", "quant_algo": "nvfp4"},
}
"""Format -> the checkpoint quant config vLLM builds humming's weight schema from (GPT-OSS's
MXFP4 goes through GPT_OSS_SCHEMA instead; both convert the same tensors the same way)."""
GPT_OSS_SCHEMA = {"quant_method": "gpt_oss_mxfp4"}
"""vLLM's schema for GPT-OSS's MXFP4 experts (convert_gpt_oss_weight_to_mxfp4_moe_kernel_format)."""
PDL_SAMPLE_ROWS = (1, 1 << 16)
"""Row counts at which prepare asks humming's heuristics whether the activation kernel uses PDL
(SM120 switches on small row counts; SM90 never), so each variant is compiled up front."""


class HummingBackend(Backend):
    name = "humming"
    formats = ("mxfp4", "nvfp4", "int4")
    capturable = True
    tunable = False
    first_use = ("NVRTC JIT of vLLM's interval tables (15-22 kernels per matrix) and the activation kernel "
                 "on the first prepare of a shape (about 10-30 s on an H200); cached in ~/.humming/cache "
                 "($HUMMING_CACHE_DIR), keyed by the absolute paths and mtimes of humming's headers, so a "
                 "moved or reinstalled humming compiles again")

    def format_hint(self, fmt):
        return " (bf16: use the reference backend)" if fmt == "bf16" else ""

    def _supports(self, spec, fmt, device) -> Support:
        if not installed():
            return Support(False, f"humming is not installed: {INSTALL_HINT}")
        cap = device_capability(device)
        if cap is None:
            return Support(False, f"needs a CUDA GPU; device {device} is not one or no GPU is visible")
        api, why = load()
        if api is None:
            return Support(False, why)
        sm = 10 * cap[0] + cap[1]
        why = api.sm_problem(sm) or api.toolchain_problem()
        if why:
            return Support(False, why)
        act_type, _ = activation(spec.activation)
        schema = schema_config(fmt, spec.activation == GPT_OSS_SWIGLU)["quant_method"]
        return Support(True, f"humming {api.version} indexed W4A16 MoE on SM{sm} ({schema} schema, {act_type} "
                             f"activation), as vLLM runs it")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        api, why = load()
        if api is None:
            raise ValueError(f"backend: {self.name}: {why}")
        dev, fmt = weights.device, weights.format
        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        interleaved = spec.activation == GPT_OSS_SWIGLU
        tensors, layers = {}, {}
        with _on(dev):
            for name, q, bias, n_stacks in (("w13", weights.w13, weights.b13, [I, I]),
                                            ("w2", weights.w2, weights.b2, [H])):
                ckpt = to_schema(fmt, q, bias, interleaved=interleaved and name == "w13")
                layer, kernel_tensors = api.transform(schema_config(fmt, interleaved), fmt, ckpt, q.shape, n_stacks,
                                                      bias is not None, dev)
                layers[name] = layer
                tensors.update({f"{name}.{key}": t for key, t in kernel_tensors.items()})
                del ckpt, kernel_tensors
            tensors["locks"] = torch.zeros(sm_count(dev) * 8, dtype=torch.int32, device=dev)  # stream-K locks
            meta = {"humming": api.version, "layers": layers, "activation": activation(spec.activation),
                    "interleaved": interleaved, "num_experts": E, "hidden_size": H, "intermediate_size": I}
            prepared = Prepared(self.name, spec, fmt, dev, tensors, meta)
            t0 = time.perf_counter()
            self._warm_up(api, prepared)
            meta["warm_up_seconds"] = time.perf_counter() - t0  # the JIT, when humming's cache was cold
        return prepared

    def _warm_up(self, api, prepared):
        """Compile every kernel the forward can pick: one forward at M = 1 (humming compiles a
        whole interval table at its first call), then the activation kernel's other PDL variants."""
        spec, dev, meta = prepared.spec, prepared.device, prepared.meta
        k, H, I = spec.top_k, meta["hidden_size"], meta["intermediate_size"]
        x = torch.zeros(1, H, dtype=torch.bfloat16, device=dev)
        ids = warm_up_ids(spec, dev)
        self.forward(prepared, x, ids, torch.ones(1, k, device=dev), torch.empty_like(x))
        cfg2 = meta["layers"]["w2"].config
        act_type, impl = meta["activation"]
        used = api.use_pdl(cfg2, k, dev)
        h = torch.zeros(1, 2 * I, dtype=torch.bfloat16, device=dev)
        for pdl in {api.use_pdl(cfg2, rows, dev) for rows in PDL_SAMPLE_ROWS} - {used}:
            api.activation(cfg2, h, torch.empty(1, I, dtype=torch.bfloat16, device=dev), act_type, impl, pdl)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # compile and launch errors surface here, not in a later forward

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        """x: [M, H] bf16 (fp16 / fp32 are rounded to bf16: humming computes in bf16);
        topk_ids: [M, k] int (-1 and ids outside [0, E) contribute nothing); topk_weights: [M, k]
        float; out: [M, H] any float dtype (written in place, every element); shared_output:
        [M, H] or None (added). Returns out."""
        self.check_prepared(prepared)
        M = x.shape[0]
        if M == 0:
            return out
        api, why = load()
        if api is None or api.version != prepared.meta["humming"]:
            loaded = why if api is None else f"humming {api.version} is loaded"
            raise ValueError(f"prepared: layout made under humming {prepared.meta['humming']}, but {loaded}")
        meta, t = prepared.meta, prepared.tensors
        E, H, I = meta["num_experts"], meta["hidden_size"], meta["intermediate_size"]
        l13, l2 = meta["layers"]["w13"], meta["layers"]["w2"]
        k = topk_ids.shape[1]
        rows = M * k
        dev = x.device
        xb = x.to(torch.bfloat16).contiguous()
        ids = topk_ids.to(torch.int32).contiguous()
        with _on(dev):
            bm1, bm2 = l13.block_m(rows), l2.block_m(rows)
            route1 = align(ids, E, bm1)
            route2 = route1 if bm2 == bm1 else align(ids, E, bm2)
            gate_up = torch.empty(rows, 2 * I, dtype=torch.bfloat16, device=dev)
            api.gemm(l13, "w13", t, xb, gate_up, route1, k, rows)
            act = torch.empty(rows, I, dtype=torch.bfloat16, device=dev)
            api.activation(l2.config, gate_up, act, *meta["activation"])
            down = torch.empty(rows, H, dtype=torch.bfloat16, device=dev)
            api.gemm(l2, "w2", t, act, down, route2, 1, rows)
            weighted_sum(down, ids, topk_weights, E, out, shared_output)
        return out


BACKEND = HummingBackend()


def device_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None without one. Tests replace this function to run
    the backend's logic on CPU tensors against a fake humming; nothing else should."""
    return cuda_capability(device)


def _on(device):
    """torch.cuda.device(device) for a CUDA device (humming resolves tables for the current one)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --- canonical <-> checkpoint schema: the only weight transform qmoe itself does ------------------
def to_schema(fmt: str, q: QuantizedTensor, bias: torch.Tensor | None = None, interleaved: bool = False) -> dict:
    """Canonical weights -> the checkpoint tensors humming's schema for `fmt` takes (no requantization).

    q: QuantizedTensor [E, N, K] (data [E, N, K/2] uint8, low nibble = even k; scales [E, N, K/G]);
    bias: [E, N] fp32 or None; interleaved: reorder rows [gate; up] -> gate0, up0, gate1, ... (w13
    of GPT-OSS). Returns (layouts in the module docstring)
      mxfp4: {"weight", "weight_scale"}; int4: {"weight_packed", "weight_scale"};
      nvfp4: {"weight", "weight_scale", "weight_scale_2"}; and "bias" bf16 [E, N] when given.
    Inverse: `from_schema` (exact for the weights; the bias is rounded to bf16).
    """
    if fmt not in SCHEMAS:
        raise ValueError(f"fmt: expected one of {', '.join(SCHEMAS)}, got {fmt!r}")
    if q.format != fmt or len(q.shape) != 3:
        raise ValueError(f"q: expected a 3-D {fmt} QuantizedTensor, got {q.format} of shape {list(q.shape)}")
    data, scales = q.data, q.scales
    if interleaved:
        data, scales = interleave_gate_up(data), interleave_gate_up(scales)
        bias = None if bias is None else interleave_gate_up(bias)
    data, scales = data.contiguous(), scales.contiguous()
    if fmt == "int4":
        out = {"weight_packed": to_pack_quantized(data), "weight_scale": scales}
    else:
        out = {"weight": data, "weight_scale": scales}
        if fmt == "nvfp4":
            out["weight_scale_2"] = q.global_scale.float().contiguous()
    if bias is not None:
        out["bias"] = bias.to(torch.bfloat16).contiguous()
    return out


def from_schema(fmt: str, tensors: dict, shape, interleaved: bool = False):
    """Inverse of `to_schema`: (QuantizedTensor of `shape` [E, N, K] in canonical layout,
    bias fp32 [E, N] or None)."""
    if fmt not in SCHEMAS:
        raise ValueError(f"fmt: expected one of {', '.join(SCHEMAS)}, got {fmt!r}")
    E, N, K = shape
    if fmt == "int4":
        data = from_pack_quantized(tensors["weight_packed"]).reshape(E, N, K // 2)
    else:
        data = tensors["weight"]
    scales, gs = tensors["weight_scale"], tensors.get("weight_scale_2") if fmt == "nvfp4" else None
    bias = tensors.get("bias")
    bias = None if bias is None else bias.float()
    if interleaved:
        data, scales = deinterleave_gate_up(data), deinterleave_gate_up(scales)
        bias = None if bias is None else deinterleave_gate_up(bias)
    return QuantizedTensor(fmt, (E, N, K), data.contiguous(), scales.contiguous(), gs), bias


def schema_config(fmt: str, gpt_oss: bool = False) -> dict:
    """The quant config vLLM builds humming's weight schema from, for `fmt` (gpt_oss: GPT-OSS's
    MXFP4 checkpoint schema)."""
    return dict(GPT_OSS_SCHEMA if gpt_oss and fmt == "mxfp4" else SCHEMAS[fmt])


def activation(act: SwiGLU) -> tuple[str, str]:
    """qmoe's SwiGLU as humming's activation kernel takes it: (activation type, C++ float
    expression of a = gate, b = up). The type is "binary_interleaved" for GPT-OSS (as vLLM:
    w13 rows interleaved), else "binary_split" (gate = first half). humming compiles whatever
    expression it is given, so every SwiGLU (any alpha, beta, limit) is expressible."""
    gate, up = "a", "b"
    if act.limit is not None:
        # comparisons with NaN are false, so these keep NaN (fminf / fmaxf would drop it, as
        # torch.clamp does not: every backend must propagate NaN like the reference)
        lim = _c_float(act.limit)
        gate, up = f"(a > {lim} ? {lim} : a)", f"(b > {lim} ? {lim} : (b < -{lim} ? -{lim} : b))"
    z = gate if act.alpha == 1.0 else f"{_c_float(act.alpha)} * {gate}"
    up_term = up if act.beta == 0.0 else f"({up} + {_c_float(act.beta)})"
    impl = f"{gate} / (1.0f + expf(-({z}))) * {up_term}"
    return ("binary_interleaved" if act == GPT_OSS_SWIGLU else "binary_split"), impl


def _c_float(v: float) -> str:
    """A C++ float literal of v (finite), parenthesized when negative."""
    s = f"{float(v)!r}f"
    return f"({s})" if v < 0 else s


# --- humming's API, probed in one place -------------------------------------------------------------
_NEEDS = (  # (module, attribute, keyword parameters qmoe passes; None: not a callable to inspect)
    ("humming.schema", "BaseWeightSchema", None),
    ("humming.schema", "HummingInputSchema", None),
    ("humming.transform", "prepare_and_transform_humming_tensors",
     ("tensors", "shape_n", "shape_k", "weight_schema", "input_schema", "num_experts", "pad_n_to_multiple",
      "pad_k_to_multiple", "has_bias", "torch_dtype", "device")),
    ("humming.tune", "get_heuristics_config",
     ("layer_config", "use_f16_accum", "use_batch_invariant", "gemm_type", "device")),
    ("humming.tune", "get_heuristics_class", ("device",)),
    ("humming.tune", "heuristics_map", None),
    ("humming.forward", "humming_forward",
     ("inputs", "weight", "weight_scale", "zero_point", "bias", "weight_scale_2", "outputs", "sorted_ids",
      "expert_ids", "num_tokens_padded", "locks", "top_k", "valid_shape_m", "compute_config", "tuning_config")),
    ("humming.forward", "may_process_input", ("inputs", "outputs", "activation_type", "activation_impl", "use_pdl")),
    ("humming.utils.cuda", "filter_cuda_paths", ("required_headers", "required_binaries")),
    ("humming.utils.nvrtc", "get_nvrtc_library_path", ()),
    ("humming.jit.runtime", "KernelRuntime", None),
)
_CONVERT_PARAMS = ("tensors", "shape_n_stacks", "shape_k_stacks", "param_dtype", "num_experts",
                   "convert_symmetric_integer")
INT4_CHUNK_ELEMENTS = 1 << 28
"""Weights per chunk of experts in humming's int4 conversion (about 1 GiB once unpacked to int32)."""


def installed() -> bool:
    """Whether a `humming` package is importable, without importing it."""
    if sys.modules.get("humming") is not None:
        return True
    try:
        return importlib.util.find_spec("humming") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Layer:
    """One prepared matrix: humming's LayerConfig, vLLM's interval table over M * top_k as the
    JSON string humming_forward takes, and each interval's block_m: ((lo, hi, block_m), ...)."""

    config: object
    tuning: str
    blocks: tuple

    def block_m(self, rows: int) -> int:
        """The block_m of the interval lo < rows <= hi (vLLM's rule; 64 when none holds)."""
        for lo, hi, bm in self.blocks:
            if lo < rows <= hi:
                return bm
        return 64


class _Humming:
    """The loaded humming package: every call qmoe makes into it goes through these methods,
    with keyword arguments only."""

    def __init__(self, module, fns: dict):
        self.module = module
        self.version = str(getattr(module, "__version__", "unknown"))
        self.fn = fns

    # capability probes
    def sm_problem(self, sm: int) -> str | None:
        tables = self.fn["heuristics_map"]
        if sm not in tables and sm // 10 * 10 not in tables:
            known = ", ".join(f"SM{s}" for s in sorted(tables))
            return f"humming {self.version} has no kernel tuning for SM{sm} (it has {known})"
        if sm < 80:
            return f"bf16 activations need SM80 or newer in humming; this GPU is SM{sm}"
        return None

    def toolchain_problem(self) -> str | None:
        """Why humming's JIT cannot compile here (found the way humming finds its toolchain,
        without compiling), or None."""
        try:
            compiler = self.fn["KernelRuntime"]._get_compiler().__name__
        except Exception:  # the compiler choice moved: assume humming's default, NVRTC
            compiler = "NVRTCCompiler"
        find = self.fn["filter_cuda_paths"]
        cuda = torch.version.cuda
        if compiler == "NVCCCompiler":
            try:
                find(required_binaries=["nvcc"])
            except Exception as e:
                return f"humming compiles with nvcc here and found none for CUDA {cuda}: {e}"
            return None
        try:
            env = find(required_headers=["cuda_runtime.h"])
        except Exception as e:
            return (f"humming's NVRTC JIT needs the CUDA {cuda} headers and found none ({e}); install the "
                    f"CUDA toolkit or the nvidia-cuda-runtime / nvidia-cuda-cccl / nvidia-cuda-nvrtc packages")
        if not any(os.path.exists(os.path.join(p, "cuda", "std", "cstdint")) for p in env["include_paths"]):
            return (f"humming's NVRTC JIT needs CCCL's cuda/std headers beside cuda_runtime.h in "
                    f"{env['path']}; install nvidia-cuda-cccl or a full CUDA toolkit")
        try:
            self.fn["get_nvrtc_library_path"]()
        except Exception as e:
            return f"humming's JIT needs libnvrtc of CUDA {cuda} ({e}); install nvidia-cuda-nvrtc"
        root = Path(self.module.__file__).parent / "_native"
        for helper in sorted(root.glob("*/nvrtc_compile")):
            if not os.access(helper, os.X_OK):
                return (f"humming's compiler helper {helper} is not executable (a wheel unpacked without "
                        f"pip loses the run bits): chmod +x {root}/*/*")
        return None

    # prepare
    def transform(self, config, fmt, ckpt, shape, n_stacks, has_bias, device):
        """Checkpoint tensors of one matrix [E, N, K] in the schema of quant `config` ->
        (Layer, humming's kernel tensors)."""
        E, N, K = shape
        hschema, tensors = self.convert(config, fmt, ckpt, shape, n_stacks)
        config, tensors = self.fn["prepare_and_transform_humming_tensors"](
            tensors=tensors, shape_n=N, shape_k=K, weight_schema=hschema,
            input_schema=self.fn["HummingInputSchema"](), num_experts=E, pad_n_to_multiple=PAD_N,
            pad_k_to_multiple=PAD_K, has_bias=has_bias, torch_dtype=torch.bfloat16, device=device)
        table = self.fn["get_heuristics_config"](layer_config=config, use_f16_accum=False,
                                                 use_batch_invariant=False, gemm_type="indexed", device=device)
        blocks = tuple((int(lo), int(hi), int(cfg["block_shape"][0])) for lo, hi, cfg in table)
        return Layer(config, json.dumps(table), blocks), dict(tensors)

    def convert(self, config, fmt, ckpt, shape, n_stacks):
        """schema.convert_humming of one matrix -> (HummingWeightSchema, standard tensors).

        int4 runs in chunks of experts: humming unpacks int4 weights to one int32 per element to
        turn offset-binary codes into sign-magnitude (45 GB for kimi-k2.5's w13, more than a GPU
        holds next to its temporaries). Chunks give the same bytes as one call: humming keeps
        uint4 for the whole matrix when any code is -8, so if any chunk kept it, every chunk is
        converted again without the sign-magnitude step."""
        E, N, K = shape
        schema = self.fn["BaseWeightSchema"].from_config(dict(config))

        def run(lo, hi, **kw):
            part = {key: t[lo:hi] for key, t in ckpt.items()}
            return schema.convert_humming(tensors=part, shape_n_stacks=n_stacks, shape_k_stacks=[K],
                                          param_dtype=torch.bfloat16, num_experts=hi - lo, **kw)

        if fmt != "int4":
            return run(0, E)
        step = max(1, INT4_CHUNK_ELEMENTS // (N * K))
        spans = [(lo, min(E, lo + step)) for lo in range(0, E, step)]
        parts = [run(lo, hi) for lo, hi in spans]
        if any(p[0] != parts[0][0] for p in parts):
            parts = [run(lo, hi, convert_symmetric_integer=False) for lo, hi in spans]
        if len(parts) == 1:
            return parts[0]
        return parts[0][0], {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}

    def use_pdl(self, config, rows: int, device) -> bool:
        """Whether humming's heuristics launch the activation kernel with PDL for `rows` rows."""
        return bool(self.fn["get_heuristics_class"](device=device).should_use_pdl_for_input(config, rows))

    # forward
    def gemm(self, layer: Layer, name: str, t: dict, inputs, outputs, route, top_k: int, rows: int):
        """One humming_forward of the indexed GEMM, as HummingIndexedExperts calls it."""
        sorted_ids, expert_ids, num_tokens_padded = route
        self.fn["humming_forward"](
            layer.config, inputs=inputs, weight=t[f"{name}.weight"], weight_scale=t.get(f"{name}.weight_scale"),
            zero_point=t.get(f"{name}.zero_point"), bias=t.get(f"{name}.bias"),
            weight_scale_2=t.get(f"{name}.weight_scale_2"), outputs=outputs, sorted_ids=sorted_ids,
            expert_ids=expert_ids, num_tokens_padded=num_tokens_padded, locks=t["locks"], top_k=top_k,
            valid_shape_m=rows, compute_config=COMPUTE_CONFIG, tuning_config=layer.tuning)

    def activation(self, config, inputs, outputs, act_type: str, impl: str, use_pdl=None):
        """humming's activation kernel: inputs [rows, 2I] -> outputs [rows, I] (use_pdl None:
        humming's heuristics decide, as in vLLM)."""
        self.fn["may_process_input"](config, inputs=inputs, outputs=outputs, activation_type=act_type,
                                     activation_impl=impl, use_pdl=use_pdl)


_LOADED: dict = {}


def load() -> tuple[_Humming | None, str]:
    """(the loaded humming, "") or (None, why not). Imports humming on first use (importing it
    starts humming's own background builds of its launcher and NVRTC helper, no-ops when the
    wheel's prebuilt ones match); probes every function and parameter qmoe uses."""
    mod = sys.modules.get("humming")
    hit = _LOADED.get("api")
    if hit is not None and mod is not None and hit.module is mod:
        return hit, ""
    fns = {}
    try:
        mod = importlib.import_module("humming")
        for where, attr, params in _NEEDS:
            obj = getattr(importlib.import_module(where), attr, None)
            if obj is None:
                return None, (f"humming {getattr(mod, '__version__', '?')} lacks {where}.{attr} "
                              f"(qmoe needs humming-kernels >= 0.1.19)")
            missing = _missing_params(obj, params)
            if missing:
                return None, (f"humming {getattr(mod, '__version__', '?')}: {where}.{attr} takes no "
                              f"{', '.join(missing)} (qmoe needs humming-kernels >= 0.1.19)")
            fns[attr] = obj
    except Exception as e:  # a broken install is a reason, never a crash
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith("humming"):
            hint = f"; its dependency {e.name!r} is missing ({INSTALL_HINT} installs it)"
        return None, f"humming is installed but failed to import ({type(e).__name__}: {e}){hint}"
    missing = _missing_params(fns["BaseWeightSchema"].convert_humming, _CONVERT_PARAMS)
    if missing:
        return None, f"humming's convert_humming takes no {', '.join(missing)} (qmoe needs humming-kernels >= 0.1.19)"
    api = _Humming(mod, fns)
    _LOADED["api"] = api
    return api, ""


def _missing_params(fn, params) -> list:
    if params is None:
        return []
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return []
    return [p for p in params if p not in sig.parameters]




__all__ = ["BACKEND", "HummingBackend", "activation", "align", "from_schema", "load", "to_schema",
           "weighted_sum"]
