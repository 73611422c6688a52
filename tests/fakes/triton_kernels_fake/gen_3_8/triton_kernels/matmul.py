"""Fake triton_kernels.matmul (3.8+): dataclasses and matmul(a, b, bias, ...) with the later
signature. Per row r of the ragged (expert-sorted) a: c[r] = act((a[gather_indx[r]] or a[r]) @
W[e] + b[e]) * gammas[r]; no scatter, no top-k sum. The block size of the MX scales is inferred
from the shapes (K / scale groups) and must be 32, as in the later releases."""

from dataclasses import dataclass

import torch

from triton_kernels.matmul_details import opt_flags
from triton_kernels.numerics import InFlexData
from triton_kernels.swiglu import swiglu_fn
from triton_kernels.tensor import FP4, RaggedTensorMetadata, Tensor
from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout
from triton_kernels_fake._common import CALLS, check, decode_k_major, expert_rows, keywords_only, swiglu_interleaved


@dataclass(frozen=True)
class FnSpecs:
    name: str
    fn: object
    fn_arg_names: tuple
    fn_arg_do_not_specialize: tuple = tuple()
    reduction_n: int = 1

    @staticmethod
    def default():
        return FnSpecs("dflt", None, tuple())


@dataclass(frozen=True)
class FusedActivation:
    specs: FnSpecs = FnSpecs.default()
    fn_args: tuple = tuple()


@dataclass(frozen=True)
class FlexCtx:
    lhs_data: InFlexData = InFlexData()
    rhs_data: InFlexData = InFlexData()
    out_data: InFlexData = InFlexData()
    acc_data: InFlexData = InFlexData()


@dataclass
class PrecisionConfig:
    max_num_imprecise_acc: int | None = None
    allow_tf32: bool = True
    flex_ctx: FlexCtx = FlexCtx()
    acc_scale: float = 1.0
    flexpoint_saturate_inf: bool = False
    report_quantization_err_fn: object = None
    a_mx_scale: object = None
    b_mx_scale: object = None
    c_mx_scale: object = None
    out_dtype: torch.dtype | None = None
    enforce_bitwise_invariance: bool = False


def _weights(b, precision_config):
    check(isinstance(b, Tensor) and b.dtype is FP4, "b: an FP4 triton_kernels Tensor")
    layout = b.storage.layout
    check(isinstance(layout, HopperMXValueLayout) and layout.mx_axis == -2 and layout.mma_version == 3,
          "b: HopperMXValueLayout(mx_axis=-2, mma_version=3): packed along K of [E, K, N]")
    s = precision_config.b_mx_scale
    check(isinstance(s, Tensor) and isinstance(s.storage.layout, HopperMXScaleLayout),
          "b_mx_scale: HopperMXScaleLayout")
    check(s.storage.layout.mx_axis == -2 and s.storage.layout.num_warps == 8, "b_mx_scale: mx_axis=-2, num_warps=8")
    E, K, N = b.shape
    check(list(s.shape)[0::2] == [E, N], f"b_mx_scale shape {s.shape} for b {b.shape}")
    check(K // s.shape[1] == 32, f"Unsupported microscale block size {K // s.shape[1]}")
    codes = layout.make_transformation(b.shape, True).unswizzle_data(b.storage.data)
    scales = s.storage.layout.make_transformation(s.shape).unswizzle_data(s.storage.data)
    return decode_k_major(codes, scales, K)


@keywords_only
def matmul(a, b, bias, a_ragged_metadata=None, b_ragged_metadata=None, gather_indx=None, scatter_indx=None,
           precision_config=None, betas=None, gammas=None, out_alpha=None, c=None, fused_comm=None,
           fused_activation=None, epilogue=None, c_acc_in=None):
    check(opt_flags._opt_flags_constraints.get("split_k") == 1, "split_k=1 not constrained (vLLM sets it on SM90)")
    check(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 and a.dim() == 2, "a: bf16 [M, K]")
    check(isinstance(a_ragged_metadata, RaggedTensorMetadata), "a_ragged_metadata: RaggedTensorMetadata")
    check(scatter_indx is None and b_ragged_metadata is None, "only gather / ragged-M is faked")
    check(bias is None or (bias.dtype == torch.float32 and bias.dim() == 2), "bias: fp32 [E, N] or None")
    W = _weights(b, precision_config)
    E, K, N = W.shape
    check(a.shape[1] == K, f"a has K={a.shape[1]}, b has K={K}")
    rows = gather_indx.shape[0] if gather_indx is not None else a.shape[0]
    offs = a_ragged_metadata.slice_offs.to(torch.int64)
    check(int(offs[-1]) == rows and a_ragged_metadata.n_slices == E, "ragged metadata must cover the rows")
    r = torch.arange(rows, device=a.device)
    experts = torch.searchsorted(offs[1:], r, right=True)
    xr = a[gather_indx.to(torch.int64)] if gather_indx is not None else a
    z = expert_rows(xr, experts, W, bias)
    if gammas is not None:
        check(gammas.shape == (rows,), "gammas: one per row")
        z = z * gammas.float().unsqueeze(1)
    act = fused_activation or FusedActivation()
    red = act.specs.reduction_n
    if act.specs.fn is not None:
        check(act.specs.fn is swiglu_fn and act.specs.fn_arg_names == ("alpha", "limit") and red == 2,
              "fused activation: FnSpecs('swiglu', swiglu_fn, ('alpha', 'limit'), reduction_n=2)")
        z = swiglu_interleaved(z, *act.fn_args)
    CALLS.append(("matmul", {"gather": gather_indx is not None, "act": act.specs.name, "fn_args": act.fn_args,
                             "gammas": None if gammas is None else gammas.dtype}))
    return z.to(torch.bfloat16)
