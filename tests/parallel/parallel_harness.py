"""Runs parallel test cases on W CPU processes joined by gloo, and the cases themselves.

`results(world)` spawns W processes once per pytest process (torch.multiprocessing, spawn),
runs every case of CASES[world] in each, in the same order, and returns
{case: {"ok": bool, "error": str}}. Each process imports torch once (2-4 s), so one spawn per
world size serves all the cases of that size.

Nothing hangs: gloo's own timeout (GLOO_TIMEOUT_S) turns a collective whose peer is gone into
an error, a rank whose case raises writes the traceback and exits at once, and the parent's
watchdog kills every rank GRACE_S after the first one fails (or all of them at WATCHDOG_S),
so the cases left report why they did not run.

A case returns nothing and raises (AssertionError with numbers) when the parallel result is not
the single-process one. "Equal" means:
- bitwise on exact data (`exact_layer`): values chosen so that every product, sum and rounding
  on the way is exact in float32 and bf16, so any order of summation gives the same bits: this
  checks the routing of every row bitwise, on any backend;
- within rounding on random data: EP and TP add one rounding to x's dtype per rank (the partial
  outputs travel in x's dtype), so bf16 results agree to a few
  parts in 1e3 and float32 results to ~1e-6 (the reference backend's CPU GEMM is not batch
  invariant: its rows change in the last bits with the number of rows an expert gets, which EP
  changes; so EP is not bitwise on random data even with the reference backend).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 60
"""init_process_group timeout: a collective waiting for a rank that died raises after this."""
WATCHDOG_S = 300
"""The parent kills every rank still running after this long."""
GRACE_S = 5
"""After the first rank fails, the others have this long to finish before they are killed."""


# --- the spawn -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def results(world: int, backend: str = "gloo") -> dict:
    """{case: {"ok", "error"}} for every case of CASES[world] (gloo, CPU tensors) or
    GPU_CASES[world] (nccl: rank r on GPU r), run once on `world` processes."""
    names = list((CASES if backend == "gloo" else GPU_CASES)[world])
    with tempfile.TemporaryDirectory(prefix=f"qmoe-parallel-w{world}-") as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, tmp, names, backend), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        why = _watch(procs)
        per_rank = []
        for r in range(world):
            try:
                with open(os.path.join(tmp, f"rank{r}.json")) as f:
                    per_rank.append(json.load(f))
            except (OSError, ValueError):
                per_rank.append({})
    out = {}
    for name in names:
        errors = [pr[name]["error"] for pr in per_rank if name in pr and not pr[name]["ok"]]
        missing = [r for r, pr in enumerate(per_rank) if name not in pr]
        if errors:
            out[name] = {"ok": False, "error": "\n".join(errors)}
        elif missing:
            out[name] = {"ok": False, "error": f"not run on ranks {missing}: {why or 'a rank exited early'}"}
        else:
            out[name] = {"ok": True, "error": ""}
    return out


def _watch(procs) -> str:
    """Wait for the processes; kill them on a failure or at the deadline. Returns why they stopped."""
    start, failed_at, why = time.monotonic(), None, ""
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        bad = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if bad and failed_at is None:
            failed_at, why = now, f"rank {bad[0]} exited with code {procs[bad[0]].exitcode}"
        if failed_at is not None and now - failed_at > GRACE_S or now - start > WATCHDOG_S:
            why = why or f"watchdog: still running after {WATCHDOG_S} s"
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
        time.sleep(0.05)
    for p in procs:
        p.join(10)
    bad = [i for i, p in enumerate(procs) if p.exitcode != 0]
    return why or (f"ranks {bad} exited with codes {[procs[i].exitcode for i in bad]}" if bad else "")


def _worker(rank, world, tmp, names, backend):
    torch.set_num_threads(1)
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # NVLink multicast stays off
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    table = CASES if backend == "gloo" else GPU_CASES
    path = os.path.join(tmp, f"rank{rank}.json")
    done = {}
    try:
        ctx = Ctx(rank, world)
    except BaseException:
        done[names[0]] = {"ok": False, "error": f"rank {rank} (setting up groups):\n{traceback.format_exc()}"}
        _write(path, done)
        os._exit(1)
    for name in names:
        try:
            table[world][name](ctx)
            done[name] = {"ok": True}
        except BaseException:
            done[name] = {"ok": False, "error": f"rank {rank}:\n{traceback.format_exc()}"}
            _write(path, done)
            os._exit(1)  # the peers' next collective times out, or the watchdog ends them
        _write(path, done)
    dist.destroy_process_group()


def _write(path, done):
    with open(path + ".tmp", "w") as f:
        json.dump(done, f)
    os.replace(path + ".tmp", path)


# --- what every case uses ------------------------------------------------------------------------

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import random_weights  # noqa: E402

import qmoe  # noqa: E402
from qmoe.backends.reference import relative_error  # noqa: E402
from qmoe.dispatch import make_plan  # noqa: E402
from qmoe.parallel import ParallelPlan, experts_batched  # noqa: E402


class Ctx:
    """This rank's view: the world group, a group of one per rank, and for 4 ranks the 2 x 2
    grid (TP pairs {0,1}, {2,3}; EP pairs {0,2}, {1,3})."""

    def __init__(self, rank, world):
        self.rank, self.world = rank, world
        self.group = dist.group.WORLD
        ones = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in order
        self.alone = ones[rank]
        if world == 4:
            tps = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            eps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
            self.tp, self.ep = tps[rank // 2], eps[rank % 2]
            self.tp_index = rank // 2     # ranks of a TP group hold the same tokens


def spec_of(E, k, H=64, I=32, bias=True, act=None):
    act = act or qmoe.SwiGLU(alpha=1.702, beta=1.0, limit=7.0)
    return qmoe.MoESpec(E, k, H, I, act, bias=bias, name=f"test E{E} k{k}")


def tokens(spec, M, seed, dtype=torch.bfloat16, ids=None):
    """x [M, H], distinct random ids [M, k] (or the given ones), softmax weights [M, k]."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(M, spec.hidden_size, generator=g).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:spec.top_k] for _ in range(M)]) \
            if M else torch.empty(0, spec.top_k, dtype=torch.int64)
    w = torch.softmax(torch.randn(M, spec.top_k, generator=g), dim=-1)
    return x, ids.to(torch.int32).reshape(M, spec.top_k), w


def exact_layer(E, k, H=64, I=32):
    """(spec, mxfp4 weights) on which every step is exact (see the module doc): x in {-1, 0, 1},
    w13 rows of eight +-1 (exact in mxfp4), gate bias +100 so the gate clamps to limit 2 and
    sigmoid(16 * 2) is 1.0 in float32, up in small integers, so the activation is an even
    integer in [-4, 4]; w2 rows of four +-1 and b2 in {-2, 0, 2}, so an expert's output (or a TP
    slice's) is an even integer in [-18, 18]. With routing weights in {1/2, 1} and shared outputs
    in [-2, 2] (`exact_tokens`, `exact_shared`) every slot output and every sum over a token's
    k <= 4 slots is an integer below 2 ** 8: exact in bf16 and float32."""
    spec = spec_of(E, k, H, I, act=qmoe.SwiGLU(alpha=16.0, beta=0.0, limit=2.0))
    g = torch.Generator().manual_seed(7)

    def signs(N, K, nonzero):
        w = torch.zeros(E, N, K)
        for e in range(E):
            for n in range(N):
                cols = torch.randperm(K, generator=g)[:nonzero]
                w[e, n, cols] = torch.randint(0, 2, (nonzero,), generator=g).float() * 2 - 1
        return w

    b13 = torch.cat([torch.full((E, I), 100.0), torch.randint(-2, 3, (E, I), generator=g).float()], dim=1)
    b2 = torch.randint(-1, 2, (E, H), generator=g).float() * 2
    return spec, qmoe.ExpertWeights.from_float(signs(2 * I, H, 8), signs(H, I, 4), "mxfp4", b13, b2)


def exact_tokens(spec, M, seed, ids=None):
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.randint(-1, 2, (M, spec.hidden_size), generator=g).to(torch.bfloat16)
    _, ids, _ = tokens(spec, M, seed, ids=ids)
    w = 2.0 ** -torch.randint(0, 2, (M, spec.top_k), generator=g).float()
    return x, ids, w


def exact_shared(spec, M, seed):
    """A shared-expert output [M, H] float32 of integers in [-2, 2]."""
    g = torch.Generator().manual_seed(3000 + seed)
    return torch.randint(-2, 3, (M, spec.hidden_size), generator=g).float()


def single(spec, weights, x, ids, w, shared=None, backend="reference"):
    """The single-process result (the plan qmoe.MoE would run), ids outside [-1, E) -> NaN rows."""
    out = torch.empty_like(x)
    if x.shape[0]:
        _, run = make_plan(spec, weights, backend).runner(x.shape[0])
        bad = ((ids < -1) | (ids >= spec.num_experts)).any(dim=1, keepdim=True)
        run(x, torch.where((ids < -1) | (ids >= spec.num_experts), -1, ids), w, out, shared)
        out.masked_fill_(bad, float("nan"))
    return out


def parallel(spec, weights, x, ids, w, shared=None, backend="reference", **groups):
    plan = ParallelPlan(spec, weights, backend, **groups)
    out = torch.full_like(x, 7.0)
    _, run = plan.runner(x.shape[0])
    assert run(x, ids, w, out, shared) is out
    return out


def same(out, ref, what, exact=False, tol=6e-3):
    """out equals ref: bitwise (exact) or within relative error tol; NaN rows must match."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.shape} {out.dtype} vs {ref.shape} {ref.dtype}"
    nan_o, nan_r = torch.isnan(out).any(1), torch.isnan(ref).any(1)
    assert torch.equal(nan_o, nan_r), f"{what}: NaN rows {nan_o.nonzero().flatten().tolist()}, " \
                                      f"expected {nan_r.nonzero().flatten().tolist()}"
    assert torch.isnan(out[nan_o]).all(), f"{what}: a row with a bad id is only partly NaN"
    o, r = out[~nan_o], ref[~nan_r]
    if exact:
        assert torch.equal(o, r), f"{what}: not bitwise equal, max |diff| {(o.float() - r.float()).abs().max()}"
    elif o.numel():
        err = relative_error(o, r)
        assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


TRANSPORTS = ({}, {"max_tokens": 8})
"""Counts exchanged on the host, and fixed buffers (no host sync)."""


def ep_case(ctx, spec, weights, Ms, *, ids_fn=None, exact=False, dtype=torch.bfloat16, group=None,
            backend="reference", shared=False):
    """EP over `group` (the world by default): rank r passes Ms[r] tokens; both transports
    equal the single-process result."""
    group = group or ctx.group
    me = dist.get_rank(group)
    M = Ms[me]
    ids = None if ids_fn is None else ids_fn(M)
    x, ids, w = (exact_tokens(spec, M, ctx.rank, ids) if exact else tokens(spec, M, ctx.rank, dtype, ids))
    sh = exact_shared(spec, M, ctx.rank) if shared else None
    ref = single(spec, weights, x, ids, w, sh, backend)
    for extra in TRANSPORTS:
        out = parallel(spec, weights, x, ids, w, sh, backend, ep_group=group, **extra)
        same(out, ref, f"EP {extra or 'counts'} M={M}", exact, tol=1e-5 if dtype == torch.float32 else 6e-3)


# --- the cases -----------------------------------------------------------------------------------

def c_ep_e8(ctx):
    spec = spec_of(8, 2)
    ep_case(ctx, spec, random_weights(spec), [5, 3, 4, 6][:ctx.world])


def c_ep_e16(ctx):
    spec = spec_of(16, 4)
    ep_case(ctx, spec, random_weights(spec, "nvfp4"), [6, 2, 7, 3][:ctx.world])


def c_ep_fp32(ctx):
    spec = spec_of(16, 4)
    ep_case(ctx, spec, random_weights(spec, "int4"), [6, 2, 7, 3][:ctx.world], dtype=torch.float32)


def c_ep_e10_uneven(ctx):  # 3, 3, 2, 2 experts over 4 ranks (5, 5 over 2)
    spec = spec_of(10, 3)
    plan = ParallelPlan(spec, random_weights(spec), "reference", ep_group=ctx.group)
    want = [(0, 3), (3, 3), (6, 2), (8, 2)] if ctx.world == 4 else [(0, 5), (5, 5)]
    assert plan.experts == want[ctx.rank], (plan.experts, want[ctx.rank])
    assert plan.local_spec.num_experts == want[ctx.rank][1] and plan.local_spec.top_k == spec.top_k
    ep_case(ctx, spec, random_weights(spec), [7, 1, 4, 2][:ctx.world])


def c_ep_skewed(ctx):  # every token's every slot goes to the last rank
    spec = spec_of(8, 2)
    last = qmoe.parallel.expert_range(8, ctx.world - 1, ctx.world)

    def ids(M):
        return torch.stack([torch.randperm(last[1])[:2] + last[0] for _ in range(M)]) if M else None
    ep_case(ctx, spec, random_weights(spec), [8, 8, 8, 8][:ctx.world], ids_fn=ids)


def c_ep_m0(ctx):  # no tokens on the odd ranks: they still serve the others
    spec = spec_of(8, 2)
    ep_case(ctx, spec, random_weights(spec), [5, 0, 3, 0][:ctx.world])
    ep_case(ctx, spec, random_weights(spec), [0] * ctx.world)


def c_ep_ids(ctx):  # -1 slots, a row of -1 only (exactly 0), ids outside [-1, E) (NaN rows), a repeated id
    spec = spec_of(8, 2)

    def ids(M):
        t = torch.tensor([[0, 7], [3, -1], [-1, -1], [8, 1], [-1, 5], [2, -3], [4, 4]])
        return t[(torch.arange(M) + ctx.rank) % 7]
    ep_case(ctx, spec, random_weights(spec), [7, 6, 7, 5][:ctx.world], ids_fn=ids)
    x, i, w = tokens(spec, 1, 0, ids=torch.tensor([[-1, -1]]))
    for extra in TRANSPORTS:
        out = parallel(spec, random_weights(spec), x, i, w, None, ep_group=ctx.group, **extra)
        assert torch.equal(out, torch.zeros_like(out)), f"a token with no expert: {out.abs().max()}"


def c_ep_exact(ctx):
    spec, weights = exact_layer(8, 4)
    ep_case(ctx, spec, weights, [6, 5, 0, 7][:ctx.world], exact=True, shared=True)


def c_ep_repeat(ctx):  # the same call twice: bitwise the same
    spec = spec_of(16, 4)
    weights = random_weights(spec)
    x, ids, w = tokens(spec, 6, ctx.rank)
    for extra in TRANSPORTS:
        plan = ParallelPlan(spec, weights, "reference", ep_group=ctx.group, **extra)
        _, run = plan.runner(6)
        a, b = torch.empty_like(x), torch.empty_like(x)
        run(x, ids, w, a)
        run(x, ids, w, b)
        assert torch.equal(a, b), f"EP {extra}: two calls differ"
    # fixed buffers after a larger call: only this call's slots are sent as rows to compute
    counted = ParallelPlan(spec, weights, "reference", ep_group=ctx.group)
    plan = counted.with_max_tokens(8)
    assert plan.local is counted.local and plan.max_tokens == 8 and counted.max_tokens is None
    for M in (8, 2):
        x, ids, w = tokens(spec, M, ctx.rank)
        out = torch.empty_like(x)
        plan.runner(M)[1](x, ids, w, out)
        same(out, single(spec, weights, x, ids, w), f"EP fixed M={M} after M=8")
        sent = int((plan.dispatch.buffers(x.dtype).send_ids >= 0).sum())
        assert sent == M * spec.top_k, f"{sent} rows named an expert after a call of {M * spec.top_k} slots"


def c_ep_alone(ctx):  # an EP group of one: the same code path, no collective
    spec = spec_of(8, 2)
    ep_case(ctx, spec, random_weights(spec), [5] * ctx.world, group=ctx.alone)
    # its fixed transport computes the plain problem itself: bitwise the single-process result,
    # bad ids included, on random data too
    weights = random_weights(spec)
    x, ids, w = tokens(spec, 5, ctx.rank, ids=torch.tensor([[0, 7], [3, -1], [-1, -1], [8, 1], [2, -3]]))
    out = parallel(spec, weights, x, ids, w, None, ep_group=ctx.alone, max_tokens=8)
    same(out, single(spec, weights, x, ids, w), "EP of one, fixed buffers", exact=True)
    spec, weights = exact_layer(8, 2)
    ep_case(ctx, spec, weights, [5] * ctx.world, exact=True, group=ctx.alone, shared=True)


def c_ep_triton(ctx):  # our Triton kernels (interpreter) as the local backend, bitwise on exact data
    spec, weights = exact_layer(8, 2)
    ep_case(ctx, spec, weights, [3, 2][:ctx.world], exact=True, backend="triton", shared=True)

    def bad(M):  # ids outside [-1, E) reach rank 0, whose triton backend poisons them itself
        t = torch.tensor([[0, 7], [9, 1], [-1, -1], [2, -4]])
        return t[(torch.arange(M) + ctx.rank) % 4]
    ep_case(ctx, spec, weights, [4, 3][:ctx.world], ids_fn=bad, backend="triton")


def tp_case(ctx, spec, weights, M, *, exact=False, dtype=torch.bfloat16, group=None, seed=0,
            backend="reference", tol=6e-3):
    group = group or ctx.group
    x, ids, w = exact_tokens(spec, M, seed) if exact else tokens(spec, M, seed, dtype)
    sh = exact_shared(spec, M, seed)
    ref = single(spec, weights, x, ids, w, sh, backend)
    out = parallel(spec, weights, x, ids, w, sh, backend, tp_group=group)
    same(out, ref, f"TP {spec.name} {weights.format} {dtype}", exact, tol=1e-5 if dtype == torch.float32 else tol)


def c_tp(ctx):
    for fmt, I in (("mxfp4", 160), ("nvfp4", 80), ("int4", 128)):  # 5, 5, 4 blocks: uneven splits but int4 on 4
        spec = spec_of(8, 2, I=I)
        weights = random_weights(spec, fmt)
        tp_case(ctx, spec, weights, 9)
        tp_case(ctx, spec, weights, 9, dtype=torch.float32)
        tp_case(ctx, spec, weights, 0)


def c_tp_exact(ctx):
    spec, weights = exact_layer(8, 4, I=32 * ctx.world)
    tp_case(ctx, spec, weights, 7, exact=True)


def c_tp_bias_once(ctx):  # w2 = 0: the output is exactly sum_j w_j b2[e_j], so b2 counted twice shows
    spec = spec_of(8, 2, I=64)
    ones = torch.ones(8, 128, 64)
    b2 = torch.arange(8 * 64).float().view(8, 64) % 5
    weights = qmoe.ExpertWeights.from_float(ones / 8, torch.zeros(8, 64, 64), "mxfp4", torch.zeros(8, 128), b2)
    x, ids, _ = tokens(spec, 4, 0)
    w = torch.full((4, 2), 0.5)
    out = parallel(spec, weights, x, ids, w, None, tp_group=ctx.group)
    want = (b2[ids.long()] * 0.5).sum(1).to(out.dtype)
    assert torch.equal(out, want), f"b2 added {out.float().sum() / want.float().sum():.2f} times"


def c_tp_triton(ctx):
    spec, weights = exact_layer(8, 2, I=32 * ctx.world)
    tp_case(ctx, spec, weights, 3, exact=True, backend="triton")


def c_eptp(ctx):  # 2 x 2: experts over the EP pairs, I over the TP pairs
    spec = spec_of(8, 2, I=64)
    weights = random_weights(spec)
    for exact in (False, True):
        if exact:
            spec, weights = exact_layer(8, 4, I=64)
        M = [6, 0][ctx.tp_index] if not exact else 5
        seed = ctx.tp_index
        x, ids, w = exact_tokens(spec, M, seed) if exact else tokens(spec, M, seed)
        sh = exact_shared(spec, M, seed)
        ref = single(spec, weights, x, ids, w, sh)
        for extra in TRANSPORTS:
            plan = ParallelPlan(spec, weights, "reference", ep_group=ctx.ep, tp_group=ctx.tp, **extra)
            assert plan.local_spec.num_experts == 4 and plan.local_spec.intermediate_size == 32
            out = torch.empty_like(x)
            _, run = plan.runner(M)
            run(x, ids, w, out, sh)
            same(out, ref, f"EP x TP {extra or 'counts'} exact={exact}", exact)


def c_batched(ctx):  # experts_batched on a TP plan: per-expert buffers, partials all-reduced
    spec = spec_of(8, 2, I=64)
    weights = random_weights(spec)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, spec.hidden_size, generator=g).bfloat16()
    counts = torch.tensor([4, 0, 2, 1, 3, 4, 0, 1], dtype=torch.int32)
    ref = experts_batched(make_plan(spec, weights, "reference"), x, counts)
    out = experts_batched(ParallelPlan(spec, weights, "reference", tp_group=ctx.group), x, counts)
    same(out.view(-1, spec.hidden_size), ref.view(-1, spec.hidden_size), "batched TP")


def c_errors(ctx):
    spec = spec_of(8, 2)
    weights = random_weights(spec)
    plan = ParallelPlan(spec, weights, "reference", ep_group=ctx.group, max_tokens=4)
    for call in (lambda: plan.runner(5), ):
        try:
            call()
        except ValueError as e:
            assert "x: expected at most max_tokens = 4 tokens" in str(e), e
        else:
            raise AssertionError("M > max_tokens was accepted")
    small = spec_of(ctx.world - 1 if ctx.world > 2 else 1, 1)
    try:
        ParallelPlan(small, random_weights(small), "reference", ep_group=ctx.group)
    except ValueError as e:
        assert str(e).startswith("ep_group: "), e
    else:
        raise AssertionError("more ranks than experts was accepted")
    for bad in (dist.GroupMember.NON_GROUP_MEMBER, "world"):
        try:
            ParallelPlan(spec, weights, "reference", ep_group=bad)
        except ValueError as e:
            assert str(e).startswith("ep_group: "), e
        else:
            raise AssertionError(f"ep_group={bad!r} was accepted")


def c_moe_facade(ctx):  # qmoe.MoE(..., ep_group=, tp_group=) once moe.py delegates to ParallelPlan
    import inspect

    if "ep_group" not in inspect.signature(qmoe.MoE).parameters:
        return  # test_ep.py skips this case then
    spec = spec_of(8, 2)
    weights = random_weights(spec)
    x, ids, w = tokens(spec, [4, 0, 3, 2][ctx.rank], ctx.rank)
    ref = single(spec, weights, x, ids, w)
    moe = qmoe.MoE(spec, weights, "reference", ep_group=ctx.group)
    same(moe.experts(x, ids, w), ref, "qmoe.MoE(ep_group=)")
    moe = qmoe.MoE(spec, weights, "reference", ep_group=ctx.group, max_tokens=4)
    same(moe.experts(x, ids.long(), w), ref, "qmoe.MoE(ep_group=, max_tokens=)")


CASES = {
    2: {f.__name__[2:]: f for f in (c_errors, c_ep_e8, c_ep_e16, c_ep_fp32, c_ep_e10_uneven, c_ep_skewed, c_ep_m0,
                                    c_ep_ids, c_ep_exact, c_ep_repeat, c_ep_alone, c_tp, c_tp_exact,
                                    c_tp_bias_once, c_batched, c_moe_facade, c_ep_triton, c_tp_triton)},
    4: {f.__name__[2:]: f for f in (c_ep_e8, c_ep_e16, c_ep_e10_uneven, c_ep_skewed, c_ep_m0, c_ep_ids,
                                    c_ep_exact, c_tp, c_tp_exact, c_eptp, c_moe_facade)},
}
"""world size -> {case name: case}, run in this order on every rank."""


# --- on GPUs (nccl): CUDA-graph capture --------------------------------------------------------

def g_capture(ctx):
    """EP with fixed buffers and TP, captured in CUDA graphs with the triton backend: replays
    with new inputs in the same tensors give the plain result (TP of one: bitwise)."""
    from qmoe.timing import capture_graph

    spec = spec_of(16, 4, H=256, I=256)
    weights = random_weights(spec).to("cuda")
    M = 16
    x, ids, w = (t.cuda() for t in tokens(spec, M, 0))
    sh = exact_shared(spec, M, 0).cuda()
    plans = {"ep": ParallelPlan(spec, weights, "triton", ep_group=ctx.group, max_tokens=M),
             "tp": ParallelPlan(spec, weights, "triton", tp_group=ctx.group)}
    assert not ParallelPlan(spec, weights, "triton", ep_group=ctx.group).capturable
    for (name, plan), shared in itertools.product(plans.items(), (sh, None)):
        assert plan.capturable, name
        out = torch.empty_like(x)
        run = plan.runner(M)[1]
        graph = capture_graph(lambda: run(x, ids, w, out, shared))  # noqa: B023 (captured now)
        for seed in (1, 2):
            x2, ids2, w2 = (t.cuda() for t in tokens(spec, M, seed))
            x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
            graph.replay()
            torch.cuda.synchronize()
            ref = single(spec, weights, x, ids, w, shared, "triton")
            same(out.clone(), ref, f"{name} graph replay {seed}, shared={shared is not None}", exact=name == "tp")


GPU_CASES = {1: {"capture": g_capture}}
"""world size -> {case name: case} for the nccl run."""
