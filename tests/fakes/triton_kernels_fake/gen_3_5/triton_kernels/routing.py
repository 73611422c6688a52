"""Fake triton_kernels.routing (3.5.x): RoutingData and the index pairs from a bitmatrix.

routing_from_bitmatrix sorts the gates (token-major flat slots) by expert, stably; slots whose id
is -1 (no expert) set no bit, get no row and sit at -1 in both index arrays, as in the real one.
It checks its inputs like vLLM's make_routing_data produces them: int16 ids, bf16 weights with
-1 on the empty slots, and a bitmatrix that holds exactly the chosen experts."""

from dataclasses import dataclass, field

import torch

from triton_kernels.tensor import Bitmatrix
from triton_kernels_fake._common import CALLS, check, keywords_only


@dataclass
class GatherIndx:
    src_indx: torch.Tensor
    dst_indx: torch.Tensor


@dataclass
class ScatterIndx:
    src_indx: torch.Tensor
    dst_indx: torch.Tensor


@dataclass
class ExptData:
    hist: torch.Tensor
    token_offs_raw: torch.Tensor
    token_offs_pad: dict
    block_pid_map: dict


@dataclass
class RoutingData:
    gate_scal: torch.Tensor = field()
    expt_hist: torch.Tensor = field()
    n_expts_tot: int = field()
    n_expts_act: int = field()
    expt_data: ExptData = None
    expected_tokens_per_expt: int = field(default=None)


def _decode_bits(words: torch.Tensor) -> torch.Tensor:
    w = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1
    return bits.reshape(words.shape[0], -1).bool()


@keywords_only
def routing_from_bitmatrix(bitmatrix, expt_scal, expt_indx, n_expts_tot, n_expts_act):
    check(isinstance(bitmatrix, Bitmatrix), "bitmatrix must be a Bitmatrix")
    check(expt_indx.dtype == torch.int16 and expt_indx.dim() == 2, f"expt_indx: int16 [M, k], got {expt_indx.dtype}")
    M, k = expt_indx.shape
    check(k == n_expts_act, "n_expts_act must be the width of expt_indx")
    check(expt_scal.dtype == torch.bfloat16 and tuple(expt_scal.shape) == (M, k),
          "expt_scal: bf16 [M, k] (vLLM rounds the routing weights to bf16)")
    words = bitmatrix.storage.data
    check(words.dtype == torch.uint32 and tuple(words.shape) == (M, -(-n_expts_tot // 32)),
          f"bitmatrix storage: uint32 [M, ceil(E/32)], got {words.dtype} {list(words.shape)}")
    check(list(bitmatrix.shape) == [M, words.shape[1] * 32], "bitmatrix shape: [M, 32 * words]")
    flat = expt_indx.reshape(-1).to(torch.int64)
    valid = flat >= 0
    check(bool((flat < n_expts_tot).all()), "expert id out of range")
    expected = torch.zeros(M, words.shape[1] * 32 + 1, dtype=torch.bool, device=flat.device)
    expected.scatter_(1, torch.where(expt_indx >= 0, expt_indx.to(torch.int64), expected.shape[1] - 1), True)
    check(torch.equal(_decode_bits(words), expected[:, :-1]), "bitmatrix bits differ from the chosen experts")
    check(bool((expt_scal[expt_indx == -1] == -1).all()), "weights of empty slots must be -1 (vLLM's convention)")
    n_valid = int(valid.sum())
    order = torch.argsort(torch.where(valid, flat, n_expts_tot), stable=True)
    topk_indx = order.to(torch.int32)
    topk_indx[n_valid:] = -1
    gate_indx = torch.full_like(topk_indx, -1)
    gate_indx[order[:n_valid]] = torch.arange(n_valid, dtype=torch.int32, device=flat.device)
    gate_scal = torch.full((M * k,), float("nan"), dtype=expt_scal.dtype, device=flat.device)  # tail: garbage
    gate_scal[:n_valid] = expt_scal.reshape(-1)[order[:n_valid]]
    hist = torch.bincount(flat[valid], minlength=n_expts_tot).to(torch.int32)
    offs = torch.cat((hist.new_zeros(1), torch.cumsum(hist, 0).to(torch.int32)))
    CALLS.append(("routing_from_bitmatrix", {"M": M, "k": k, "valid": n_valid}))
    return (RoutingData(gate_scal, hist, n_expts_tot, n_expts_act, ExptData(hist, offs, {}, {})),
            GatherIndx(src_indx=topk_indx, dst_indx=gate_indx), ScatterIndx(src_indx=gate_indx, dst_indx=topk_indx))
