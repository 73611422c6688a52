"""Fake triton_kernels.matmul_ogs (3.5.x): the dataclasses and matmul_ogs with the real signature.

matmul_ogs decodes w from the fake's own layouts, then per routed row r (expert-sorted, r < the
routed count): y[r] = act((x[gather.src_indx[r] // k] or x[r]) @ W[e] + b[e]) * gammas[r].
Without scatter the rows land at r (rows past the routed count are left as NaN: garbage); with
scatter and k > 1 the k rows of each token are summed into its output row (all rows written, 0
for a token with no expert); with k == 1 (fused scatter) only routed rows are written."""

from dataclasses import dataclass

import torch

from triton_kernels.matmul_ogs_details import opt_flags
from triton_kernels.numerics import InFlexData
from triton_kernels.swiglu import swiglu_fn
from triton_kernels.tensor import FP4, Tensor
from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout
from triton_kernels_fake._common import CALLS, check, decode_k_major, expert_rows, keywords_only, swiglu_interleaved


@dataclass(frozen=True)
class FnSpecs:
    name: str
    fn: object
    fn_arg_names: tuple
    fn_arg_do_not_specialize: tuple = tuple()

    @staticmethod
    def default():
        return FnSpecs("dflt", None, tuple())


@dataclass(frozen=True)
class FusedActivation:
    specs: FnSpecs = FnSpecs.default()
    fn_args: tuple = tuple()
    reduction_n: int = 1


@dataclass(frozen=True)
class FlexCtx:
    lhs_data: InFlexData = InFlexData()
    rhs_data: InFlexData = InFlexData()
    out_data: InFlexData = InFlexData()


@dataclass
class PrecisionConfig:
    max_num_imprecise_acc: int = None
    allow_tf32: bool = True
    flex_ctx: FlexCtx = FlexCtx()
    acc_scale: int = 1.0
    flexpoint_saturate_inf: bool = False
    report_quantization_err_fn: object = None
    act_scale: object = None
    weight_scale: object = None
    out_scale: object = None
    out_dtype: torch.dtype = None
    enforce_bitwise_invariance: bool = False


def _weights(w, precision_config):
    check(isinstance(w, Tensor) and w.dtype is FP4, "w: an FP4 triton_kernels Tensor")
    layout = w.storage.layout
    check(isinstance(layout, HopperMXValueLayout) and layout.mx_axis == 1,
          "w: HopperMXValueLayout packed along K (mx_axis=1), as make_default_matmul_mxfp4_w_layout(mx_axis=1)")
    s = precision_config.weight_scale
    check(isinstance(s, Tensor) and isinstance(s.storage.layout, HopperMXScaleLayout),
          "weight_scale: HopperMXScaleLayout")
    check(s.storage.layout.mx_axis == 1 and s.storage.layout.num_warps == 8,
          "weight_scale: mx_axis=1, num_warps=8 (vLLM's make_default_matmul_mxfp4_w_scale_layout)")
    check(isinstance(precision_config.flex_ctx.rhs_data, InFlexData), "flex_ctx.rhs_data: InFlexData")
    E, K, N = w.shape
    groups = s.shape[1]
    check(list(s.shape) == [E, groups, N] and groups * 32 >= K, f"weight_scale shape {s.shape} for w {w.shape}")
    check(groups % 4 == 0, f"scale K groups ({groups}) must be a multiple of 4 on SM90 (triton issue 47303; "
                           "vLLM pads them)")
    codes = layout.unswizzle_data(w.storage.data)
    scales = s.storage.layout.unswizzle_data(s.storage.data)
    return decode_k_major(codes, scales, K)


@keywords_only
def matmul_ogs(x, w, bias, routing_data=None, gather_indx=None, scatter_indx=None, precision_config=None,
                betas=None, gammas=None, out_alpha=None, y=None, fused_activation=None, epilogue=None):
    check(opt_flags._opt_flags_constraints.get("split_k") == 1, "split_k=1 not constrained (vLLM sets it on SM90)")
    check(isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and x.dim() == 2, "x: bf16 [M, K]")
    check(hasattr(routing_data, "expt_hist") and hasattr(routing_data, "n_expts_act"), "routing_data: RoutingData")
    check(bias is None or (bias.dtype == torch.float32 and bias.dim() == 2), "bias: fp32 [E, N] or None")
    W = _weights(w, precision_config)
    E, K, N = W.shape
    check(x.shape[1] == K, f"x has K={x.shape[1]}, w has K={K}")
    act = fused_activation or FusedActivation()
    hist = routing_data.expt_hist
    offs = torch.cat((hist.new_zeros(1), torch.cumsum(hist, 0)))
    n_valid = int(offs[-1])
    rows = torch.arange(n_valid, device=x.device)
    experts = torch.searchsorted(offs[1:].to(torch.int64), rows, right=True)
    k = routing_data.n_expts_act
    if gather_indx is not None:
        src = gather_indx.src_indx[:n_valid].to(torch.int64)
        check(bool((src >= 0).all()), "gather index of a routed row is -1")
        xr, n_rows = x[src // k], gather_indx.src_indx.shape[0]
    else:
        xr, n_rows = x[:n_valid], x.shape[0]
    z = expert_rows(xr, experts, W, bias)
    if gammas is not None:
        z = z * gammas[:n_valid].float().unsqueeze(1)
    if act.specs.fn is not None:
        check(act.specs.fn is swiglu_fn and act.specs.fn_arg_names == ("alpha", "limit") and act.reduction_n == 2,
              "fused activation: FnSpecs('swiglu', swiglu_fn, ('alpha', 'limit')) with reduction_n=2")
        z = swiglu_interleaved(z, *act.fn_args)
    n_out = N // act.reduction_n
    if scatter_indx is None:
        out_rows = n_rows
    else:
        check(scatter_indx.src_indx.shape[0] % k == 0, "scatter index length")
        out_rows = scatter_indx.src_indx.shape[0] // k
    if y is None:
        y = torch.empty(1, out_rows, n_out, dtype=torch.bfloat16, device=x.device)
    check(tuple(y.shape) == (1, out_rows, n_out) and y.dtype == torch.bfloat16,
          f"y: bf16 {[1, out_rows, n_out]}, got {y.dtype} {list(y.shape)}")
    zb = z.to(torch.bfloat16)
    if scatter_indx is None:
        y[0, n_valid:] = float("nan")  # the kernel leaves these rows unwritten
        y[0, :n_valid] = zb
    elif k == 1:  # fused scatter: routed rows go straight to their token; other rows untouched
        y[0, scatter_indx.dst_indx[:n_valid].to(torch.int64)] = zb
    else:
        idx = scatter_indx.src_indx.view(out_rows, k).to(torch.int64)
        padded = torch.cat((zb.float(), zb.new_zeros(1, n_out).float()))
        y[0] = padded[torch.where(idx < 0, n_valid, idx)].sum(1).to(torch.bfloat16)
    CALLS.append(("matmul_ogs", {"gather": gather_indx is not None, "scatter": scatter_indx is not None,
                                 "act": act.specs.name, "y_ptr": y.data_ptr(), "fn_args": act.fn_args,
                                 "gammas": None if gammas is None else gammas.dtype}))
    return y[0]

