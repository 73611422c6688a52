"""qmoe.parallel on GPUs against plain qmoe.MoE: outputs and times, at real shapes.

    python scripts/device/parallel_check.py                        # one GPU: EP and TP groups of one
    torchrun --nproc-per-node 8 scripts/device/parallel_check.py   # 8 GPUs: EP = 8, TP = 8

For gpt-oss-120b (mxfp4) and kimi-k2.5 (int4) weights from qmoe.weights.random_weights (the same
on every rank), at M tokens per rank: the relative error of each parallel result against plain
qmoe.MoE on the same rank's tokens (all experts, whole I), and the median microseconds of
  plain        qmoe.MoE.experts                      (CUDA-graph replays, L2 flushed: qmoe.timing)
  ep           EP, fixed buffers of max_tokens = M     (graph replays: the capturable transport)
  tp           TP                                      (graph replays)
  plain_eager  qmoe.MoE.experts, eager calls
  ep_counted   EP, counts exchanged on the host       (eager: it syncs with the host every call)
  dispatch_combine_w2/4/8  rank 0's send-row launch + combine of a group of W at these tokens,
               on this GPU without the collective (what EP adds besides moving rows)
(each group of timings interleaved: qmoe.timing.measure_many)
With one GPU the groups have one rank: EP runs its dispatch and combine with no collective, so
ep / plain is the cost of the EP code path itself. Prints a table; rank 0 writes
$OUT/parallel_check.json (every rank's rows). NVLink multicast is kept off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 unless set).

Options: --presets gpt-oss-120b,kimi-k2.5  --tokens 1,16,256,4096  --backend auto  --reps 30
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import qmoe  # noqa: E402
from qmoe.backends.reference import relative_error  # noqa: E402
from qmoe.parallel import ParallelPlan  # noqa: E402
from qmoe.spec import PRESET_FORMATS  # noqa: E402
from qmoe.timing import measure_many  # noqa: E402
from qmoe.weights import random_weights  # noqa: E402


def init():
    """(rank, world): torchrun's environment if present, else a group of one through a file."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        torch.cuda.set_device(0)
        path = os.path.join(tempfile.mkdtemp(prefix="qmoe-parallel-"), "init")
        dist.init_process_group("nccl", init_method=f"file://{path}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    return dist.get_rank(), dist.get_world_size()


def tokens(spec, M, seed):
    """x [M, H] bf16 and its routing (qmoe.route on random logits) on the current GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, spec.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    ids, w = qmoe.route(spec, torch.randn(M, spec.num_experts, device="cuda", generator=g))
    return x, ids, w


def check_preset(name, ms, args, rank, world, say):
    """Rows of one preset (its weights and layouts are freed on return)."""
    group, rows = dist.group.WORLD, []
    spec, fmt = qmoe.presets[name], PRESET_FORMATS[name]
    weights = random_weights(spec, fmt, "cuda", seed=0)
    plain = qmoe.MoE(spec, weights, args.backend)
    ep_counted = ParallelPlan(spec, weights, args.backend, ep_group=group)
    tp = ParallelPlan(spec, weights, args.backend, tp_group=group)
    say(f"\n{name} ({fmt}): plain {plain.backend_for(1)}; EP local {ep_counted.backend_for(1)}; "
        f"TP local {tp.backend_for(1)}")
    say(ep_counted.explain(16))
    say(tp.explain(16))
    for M in ms:
        rows.append(check_tokens(spec, fmt, M, plain, ep_counted, tp, args, rank, world, say))
    return rows


def check_tokens(spec, fmt, M, plain, ep_counted, tp, args, rank, world, say):
    x, ids, w = tokens(spec, M, 1000 * rank + M)   # EP: each rank its own tokens
    xt, idt, wt = tokens(spec, M, M)               # TP: the ranks share their tokens
    ep = ep_counted.with_max_tokens(M)
    run_ep, run_epc, run_tp = ep.runner(M)[1], ep_counted.runner(M)[1], tp.runner(M)[1]
    ref, ref_t = plain.experts(x, ids, w), plain.experts(xt, idt, wt)
    outs = {k: torch.empty_like(x) for k in ("plain", "ep", "ep_counted", "tp")}
    run_ep(x, ids, w, outs["ep"])
    run_epc(x, ids, w, outs["ep_counted"])
    run_tp(xt, idt, wt, outs["tp"])
    err = {"ep": relative_error(outs["ep"], ref), "ep_counted": relative_error(outs["ep_counted"], ref),
           "tp": relative_error(outs["tp"], ref_t), "tp_bitwise": bool(torch.equal(outs["tp"], ref_t))}
    reps = args.reps
    # the graph replays interleaved (qmoe.timing.measure_many): plain, ep and tp under the same clocks
    t = measure_many({"plain": lambda: plain.experts(x, ids, w, out=outs["plain"]),
                      "ep": lambda: run_ep(x, ids, w, outs["ep"]),
                      "tp": lambda: run_tp(xt, idt, wt, outs["tp"])}, device="cuda", reps=reps)
    t.update(measure_many({"plain_eager": lambda: plain.experts(x, ids, w, out=outs["plain"]),
                           "ep_counted": lambda: run_epc(x, ids, w, outs["ep_counted"])}, device="cuda",
                          reps=reps, use_graph=False))
    t.update(dispatch_alone(spec, x, ids, w, reps))
    row = {"preset": spec.name, "format": fmt, "rank": rank, "world": world, "M": M,
           "backend": {"plain": plain.backend_for(M), "ep": ep.backend_for(M), "tp": tp.backend_for(M)},
           "us": {k: v["median_us"] for k, v in t.items()}, "method": {k: v["method"] for k, v in t.items()},
           "notes": {k: v["note"] for k, v in t.items() if v["note"]}, "rel_err_vs_plain": err}
    us = row["us"]
    alone = "  ".join(f"W={n.split('_w')[1]} {us[n]:.1f}" for n in us if n.startswith("dispatch_combine_w"))
    say(f"  M={M:5d}  plain {us['plain']:9.1f}  ep {us['ep']:9.1f} ({us['ep'] / us['plain']:.3f}x)  "
        f"tp {us['tp']:9.1f} ({us['tp'] / us['plain']:.3f}x)  | eager: plain {us['plain_eager']:9.1f}  "
        f"ep_counted {us['ep_counted']:9.1f} ({us['ep_counted'] / us['plain_eager']:.3f}x)  | err ep "
        f"{err['ep']:.1e} counted {err['ep_counted']:.1e} tp {err['tp']:.1e}"
        f"{' (bitwise)' if err['tp_bitwise'] else ''}  [{', '.join(sorted(set(row['method'].values())))}]")
    say(f"         EP send rows + combine alone (one GPU, the shapes of W ranks, no collective): {alone} us")
    for k, note in row["notes"].items():
        if k in ("plain", "ep", "tp"):
            say(f"      {k}: {note}")
    return row


def dispatch_alone(spec, x, ids, w, reps):
    """{"dispatch_combine_w<W>": measure's dict}: rank 0's send-row launch and combine of an EP
    group of W = 2, 4, 8 at these tokens (T = M), timed on this GPU with no collective (the
    collective's place is taken by the send buffers themselves): what EP adds besides moving rows."""
    from qmoe.kernels.ep_dispatch import fill_send_rows
    from qmoe.parallel.ep import ExpertDispatch, combine

    M, H = x.shape
    fns = {}
    for W in (2, 4, 8):
        d = ExpertDispatch(None, 0, W, spec.num_experts, spec.top_k, H, "cuda", max_tokens=M)
        b = d.buffers(x.dtype)
        out = torch.empty_like(x)

        def run(d=d, b=b, out=out, W=W):
            fill_send_rows(d._route, x, ids, w, b.send_x, b.send_ids, b.send_w)
            combine(b.send_x.view(W, M, H)[:, :M], out)
        fns[f"dispatch_combine_w{W}"] = run
    return measure_many(fns, device="cuda", reps=reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt-oss-120b,kimi-k2.5")
    ap.add_argument("--tokens", default="1,16,256,4096")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    rank, world = init()
    ms = [int(m) for m in args.tokens.split(",")]
    rows = []
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{torch.cuda.get_device_name()} x {world}, torch {torch.__version__}, qmoe {qmoe.__version__}, "
        f"backend {args.backend}, NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}")
    for name in args.presets.split(","):
        rows += check_preset(name, ms, args, rank, world, say)
        torch.cuda.empty_cache()
    every = [None] * world
    dist.all_gather_object(every, rows)
    if rank == 0:
        out = os.environ.get("OUT", ".")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "parallel_check.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
                       "qmoe": qmoe.__version__, "backend": args.backend,
                       "rows": [r for rs in every for r in rs]}, f, indent=1)
        print(f"\nwrote {os.path.join(out, 'parallel_check.json')}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
