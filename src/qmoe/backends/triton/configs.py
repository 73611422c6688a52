"""Launch configurations of the triton backend: the measured table, its rule, and the defaults.

Configurations come from a table keyed by GPU, format, shape (E, H, I, top_k) and the Triton
and qmoe versions that measured them (a new Triton or new kernels can change what is fastest),
holding one KernelConfig per M bucket. Two files, the user's over the shipped one per bucket:

- `configs.json` beside this module: shipped, filled by `qmoe tune --kernels` on the GPUs qmoe
  is developed on;
- the user's: $QMOE_TRITON_CONFIGS, else $XDG_CACHE_HOME/qmoe/triton_configs.json, else
  ~/.cache/qmoe/triton_configs.json (written by `qmoe tune --kernels`).

Both go through the one table store (qmoe.tuning.store: damaged files and entries are ignored
with a warning naming them, writes are locked and atomic) and the one bucket rule
(qmoe.tuning.buckets.nearest_bucket). Every configuration is checked against the padded shape
where it is loaded (an entry with an unusable one is skipped with a warning naming the file and
the entry) and again where it is launched (kernels.moe.fused_moe). `default_config` covers
anything no table holds.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, fields, replace

from ...kernels.layout import PAD, round_up
from ...tuning import library_versions
from ...tuning.buckets import nearest_bucket
from ...tuning.store import TableStore, entry_key, stale

ENV_VAR = "QMOE_TRITON_CONFIGS"
SHIPPED = os.path.join(os.path.dirname(__file__), "configs.json")


def kernel_config(d):
    """A KernelConfig from its JSON dict (ValueError / TypeError for a malformed one)."""
    from ...kernels.moe import KernelConfig

    if not isinstance(d, dict):
        raise TypeError(f"a config must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(KernelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    flags = {f.name for f in fields(KernelConfig) if f.type in (bool, "bool")}
    for k, v in d.items():
        want = bool if k in flags else int
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise TypeError(f"config field {k!r} must be {want.__name__}, got {v!r}")
    return KernelConfig(**d)


def padded_sizes(shape: dict) -> tuple[int, int]:
    """(Hp, Ip): the hidden and intermediate sizes the kernel layout pads to."""
    return round_up(int(shape["hidden_size"]), PAD), round_up(int(shape["intermediate_size"]), PAD)


def validate_entry(entry) -> str | None:
    """None if a config-table entry is usable, else why not (every config is checked against
    the entry's padded shape)."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    for name in ("buckets", "shape", "versions"):
        if not isinstance(entry.get(name), dict):
            return f"'{name}' is not a JSON object"
    Hp, Ip = padded_sizes(entry["shape"])
    fmt = entry.get("format")
    for b, d in entry["buckets"].items():
        if not b.isdigit() or int(b) < 1:
            return f"bucket {b!r} is not a positive token count"
        why = kernel_config(d).problem_with(fmt, Hp, Ip)
        if why is not None:
            return f"bucket {b}: {why}"
    return None


USER_TABLE = TableStore("qmoe-triton-configs", "triton_configs.json", ENV_VAR, validate_entry)
"""The user's launch-config table (qmoe tune --kernels writes it)."""


def versions() -> dict:
    """The library versions a launch-config entry is keyed by."""
    v = library_versions()
    return {"triton": v["triton"], "qmoe": v["qmoe"]}


def wgmma(cfg) -> bool:
    """Whether Triton runs both GEMMs of a configuration on Hopper's wgmma (rather than mma.sync):
    the MMA's M side (the weight's tile of block_n1 / block_n2 columns when the weight goes first,
    swap; else the block_m token rows) a multiple of 64 in both GEMMs, with whole warpgroups (a
    multiple of 4 warps). Triton's rule for its version-3 MMA, which exists on Hopper (SM90) only:
    elsewhere the rule names the configurations that would be wgmma's there, and the tuner's
    bitwise check (tune.py) is what holds the family together. Tail blocks change only the token
    side (N). The token side needs 16 rows too: with 8-row blocks (the weight first) Triton 3.6
    emits mma.sync's m16n8k16 (CPU SASS, scripts/dev/sass_loop.py --block-m 8 --swap 1). Triton 3.9
    emits wgmma's m64n8k16 for them (scripts/dev/compile_table.py, session 17): there the rule
    leaves some wgmma configurations out of the family, which costs speed, not correctness."""
    sides = (cfg.block_n1, cfg.block_n2) if cfg.swap else (cfg.block_m, cfg.block_m)
    return cfg.num_warps % 4 == 0 and all(s % 64 == 0 for s in sides) and cfg.block_m >= 16


def invariant(cfg) -> bool:
    """Whether a configuration belongs to the batch-invariant family: every output element's K
    reduction is one chain of wgmma steps of 16 columns in K order, whatever the batch and the
    tile (`wgmma`, no split-K in either GEMM). Measured on an H200, bitwise (session 10,
    scripts/device/probe.py: 256 tokens and their prefixes of 1, 3 and 16): the weight first in
    16-, 32-, 64- and 128-row blocks, 64- or 128-column tiles, 4 or 8 warps, 3 or 4 stages, with
    the grouping inside the GEMMs and PDL, with tail blocks, and the weight second in 64- and
    128-row blocks all give the same bits; mma.sync blocks (16 or 32 rows with the weight second,
    or 32-column tiles with the weight first) are a family of their own that differs from this one
    in some rows (51 of 256 for gpt-oss-120b); split-K adds partial sums in another order. This
    family replaced the mma.sync one in session 10: it holds the fastest prefill configurations
    (the weight first, session 9), which the mma.sync family kept out at 1.6-1.9x the time. Since
    session 17 every member stores the slots' rows of y in bf16 (y_bf16), as the default mode's
    prefill entries do: a row rounded once from an invariant fp32 sum is invariant, and the
    combine adds a token's rows in slot order, so the family keeps its property, and at prefill
    its entries are the default's kernels. A member with fp32 rows would give other bits, so those
    are out; so is stream-K (stream_k1), whose K cuts depend on the number of tiles."""
    return wgmma(cfg) and cfg.split_k == 1 and cfg.split_k1 == 1 and cfg.y_bf16 and not cfg.stream_k1


def problem(gpu: str, fmt: str, spec, batch_invariant: bool = False) -> str:
    mode = "|batch-invariant" if batch_invariant else ""
    return (f"{gpu}|{fmt}|E{spec.num_experts} H{spec.hidden_size} I{spec.intermediate_size} "
            f"k{spec.top_k}{mode}")


def load_configs(gpu: str, fmt: str, spec, user_path=None, shipped_path=SHIPPED, batch_invariant: bool = False):
    """({bucket: KernelConfig}, notes) for this GPU, format and shape under the installed
    Triton and qmoe: the shipped table's entry, then the user's on top (per bucket); with
    batch_invariant, the entry of invariant configurations (`invariant`).

    notes: lines saying where the configs came from, or why a stale entry was ignored.
    Never raises: damaged tables and entries are skipped with a warning naming them.
    """
    prob, vers = problem(gpu, fmt, spec, batch_invariant), versions()
    key = entry_key(prob, vers)
    configs, notes = {}, []
    for label, path in (("shipped", shipped_path), ("user", user_path)):
        entries = USER_TABLE.read(path)["entries"]
        if key in entries:
            found = {int(b): kernel_config(d) for b, d in entries[key]["buckets"].items()}
            if batch_invariant:
                outside = sorted(b for b, c in found.items() if not invariant(c))
                if outside:  # an entry written before the family became wgmma's (session 10)
                    notes.append(f"{label} batch-invariant launch configs for buckets {outside} are outside the "
                                 f"batch-invariant family (`invariant`): ignored (run `qmoe tune --kernels`)")
                found = {b: c for b, c in found.items() if invariant(c)}
            configs.update(found)
            notes.append(f"{label} launch configs for buckets {sorted(int(b) for b in entries[key]['buckets'])} "
                         f"({USER_TABLE.path(path)})")
        for _, diff in stale(prob, vers, entries):
            notes.append(f"{label} launch configs in {USER_TABLE.path(path)} were measured with {diff}: ignored "
                         f"(run `qmoe tune --kernels`)")
    return configs, notes


def config_for(configs: dict, m: int, spec, fmt: str, batch_invariant: bool = False):
    """The launch configuration for m tokens: the table's config of m's bucket (the one rule),
    else `default_config`."""
    if configs:
        return configs[nearest_bucket(m, configs)]
    return default_config(m, spec.top_k, spec.num_experts, fmt, batch_invariant)


def write_configs(gpu: str, fmt: str, spec, buckets: dict, path=None, batch_invariant: bool = False):
    """Merge {bucket: KernelConfig} for (gpu, fmt, shape) under the installed versions into the
    user's table (locked, atomic), in the batch-invariant entry when asked. Returns the path."""
    key = entry_key(problem(gpu, fmt, spec, batch_invariant), versions())
    new = {str(int(b)): asdict(c) for b, c in buckets.items()}

    def change(entries):
        old = entries.get(key, {}).get("buckets", {})
        entries[key] = {
            "gpu": gpu, "format": fmt, "versions": versions(),
            "shape": {"num_experts": spec.num_experts, "hidden_size": spec.hidden_size,
                      "intermediate_size": spec.intermediate_size, "top_k": spec.top_k},
            "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "buckets": {**old, **new}}

    return USER_TABLE.update(change, path)


def default_config(m: int, top_k: int, num_experts: int, fmt: str = "mxfp4", batch_invariant: bool = False):
    """Launch configuration when no table entry exists (measured on an H200 at gpt-oss-120b
    shapes, docs/performance.md): 16-row blocks while experts see up to ~12 tokens, with the
    grouping inside the GEMMs and programmatic dependent launch while there are at most 32
    (token, expert) slots; 32-row blocks up to ~48 tokens per expert, then 128-row blocks, both
    with the weight as the MMA's first operand (swap; session 9: the fastest configuration at
    M >= 1024 for the three formats, and at M = 256 faster than the same 32-row block with the
    weight second: 758 against 864 us for gpt-oss-120b, 244 against 249 for qwen3-30b-a3b, 3977
    against 4343 for kimi-k2.5); the 128-row blocks with 32-row tail blocks (session 10, an A/B
    against the table: 128-row blocks with 32-row tails 9-15% faster than without for gpt-oss-120b
    at M = 4096 and 8192, 2-3% for qwen3-30b-a3b; no gain for kimi-k2.5 at 4096, whose tuned entry
    has none). batch_invariant: the weight first at decode too (`invariant`; session 10:
    1.02-1.10x the weight second's time for gpt-oss-120b and kimi-k2.5 at M = 1..64, 0.94-0.96x
    for qwen3-30b-a3b at M = 4..64), and the slots' rows in bf16 (the family's since session 17).
    The scales are loaded as 32- and 64-bit words everywhere: the same bits, faster or within the
    spread in every case measured (32-bit: decode in session 5, prefill in session 6; 64-bit:
    session 8)."""
    from ...kernels.moe import KernelConfig

    per_expert = m * top_k / num_experts
    if m * top_k <= 32:
        c = KernelConfig(block_m=16, block_n1=64, block_n2=64, swap=batch_invariant, num_warps=4, num_stages=3,
                         k_unroll=4, direct=True, pdl=True)
    elif per_expert <= 12:
        c = KernelConfig(block_m=16, block_n1=64, block_n2=64, swap=batch_invariant, num_warps=4, num_stages=3,
                         k_unroll=4)
    elif per_expert <= 48:
        c = KernelConfig(block_m=32, block_n1=64, block_n2=64, swap=True, num_warps=4, num_stages=3, k_unroll=2)
    else:
        c = KernelConfig(block_m=128, block_n1=64, block_n2=64, swap=True, num_warps=4, num_stages=3, k_unroll=2,
                         tail_m=32)
    return replace(c, scale_words=True, y_bf16=batch_invariant)


def with_whole_k(cfg, fmt: str, hidden: int, hidden_padded: int):
    """cfg with whole_k where GEMM1 would otherwise run a remainder loop after its unrolled one (the
    hidden size no multiple of 2G x k_unroll, as gpt-oss's 2880) and whole_k can run over the
    padded hidden size (KernelConfig.whole_k_problem); else cfg. The same bits either way; on an
    H200 gpt-oss-120b took 0.95x the time at M = 1024 with it and 0.99-1.00x at M = 4, 16, 4096
    and 8192 (docs/performance.md, session 15)."""
    from ...kernels.moe import FORMAT_BLOCKS

    chunk, u = 2 * FORMAT_BLOCKS[fmt], cfg.k_unroll
    if cfg.whole_k or cfg.split_k1 > 1 or (hidden // chunk) // u * u == hidden_padded // chunk:
        return cfg
    whole = replace(cfg, whole_k=True)
    return cfg if whole.whole_k_problem(fmt, hidden_padded) else whole


def candidates(m: int, top_k: int, num_experts: int, fmt: str = "mxfp4", batch_invariant: bool = False,
               padded=None):
    """Launch configurations worth timing at m tokens (a handful per regime, so that tuning three
    presets fits in minutes): decode tiles of 16 rows with the grouping inside the GEMMs and
    programmatic dependent launch, and without (the default), with GEMM2 tiles of 64 or 128
    columns (nvfp4 also with 2 warps), or with more loads in flight (4 stages, 8 chunks per stage,
    8 warps, 32-column GEMM1 tiles); split-K (2 or 4 parts, GEMM1 and GEMM2) when almost every
    expert sees one token (8-row blocks too, and GEMM1 as stream-K: `KernelConfig.stream_k1`), and
    GEMM1 in two parts up to 4 tokens per expert (twice the programs, for a short last wave);
    32- and 64-row blocks in between; 128-row blocks for prefill; at every M also with the weight
    as the MMA's first operand (`swap`: a wgmma register operand on Hopper, the batch-invariant
    family): 16-row decode tiles, 8-row ones (mma.sync, outside that family), and from 2 tokens
    per expert 32- to 128-row blocks, 4 stages or 4 chunks per iteration, and tail blocks
    (`KernelConfig.tail_m`).
    All load the scales as 32- or 64-bit words (`default_config`). From 2 tokens per expert, each
    without split-K also stores the slots' rows of y in bf16 (`KernelConfig.y_bf16`); below that,
    those that are then in the batch-invariant family (`invariant`, whose rows are bf16, so its
    lists hold only such twins); from 16 tokens per expert
    also 256-column tiles (8 warps), with bf16 rows only. padded: (Hp, Ip), the padded hidden and
    intermediate sizes (`padded_sizes`): candidates whose tiles do not divide them are left out."""
    from ...kernels.moe import KernelConfig as C

    per_expert = m * top_k / num_experts
    fast = dict(direct=True, pdl=True) if m * top_k <= 32 else {}
    out = [default_config(m, top_k, num_experts, fmt), default_config(m, top_k, num_experts, fmt, True)]
    if per_expert <= 12:
        out += [C(16, 32, 64, False, 4, 3, 4, **fast), C(16, 64, 64, False, 4, 3, 4, **fast),
                C(16, 64, 64, False, 4, 3, 4, pdl=True), C(16, 64, 128, False, 4, 3, 4, **fast),
                C(16, 64, 128, False, 4, 3, 4, pdl=True)]
        # more bytes in flight per SM: a fourth stage, 8 chunks per stage, 8 warps over 128 columns;
        # or 32-column GEMM1 tiles at 80 registers (int4, mxfp4; 123 at 64 columns: more programs per SM)
        lat = fast or dict(pdl=True)
        out += [C(16, 64, 128, False, 4, 4, 4, **lat), C(16, 64, 128, False, 4, 2, 8, **lat),
                C(16, 128, 128, False, 8, 3, 4, **lat), C(16, 32, 128, False, 4, 4, 4, **lat)]
        # the weight first (wgmma: the batch-invariant family): 0.94-0.96x the weight second's time for
        # qwen3-30b-a3b nvfp4 at M = 4..64, 1.02-1.10x for gpt-oss-120b and kimi-k2.5 (session 10)
        out += [C(16, 64, 64, True, 4, 3, 4, **fast), C(16, 64, 128, True, 4, 3, 4, **fast),
                C(16, 64, 128, True, 4, 3, 4, **lat), C(16, 64, 128, True, 4, 4, 4, **lat),
                C(16, 128, 128, True, 8, 3, 4, **lat), C(16, 64, 64, True, 4, 3, 2, **lat)]
        # 8-row blocks, the weight first (mma.sync's n8 side: half the MMAs and activation loads of 16
        # rows): 0.86-0.95x the table's time at M = 1..256 for kimi-k2.5, 0.90-0.94x at M = 4..64 for
        # gpt-oss-120b, 0.91-0.98x at M = 1..64 for qwen3-30b-a3b (session 12)
        out += [C(8, 64, 64, True, 4, 3, 4, **fast), C(8, 64, 128, True, 4, 3, 4, **fast),
                C(8, 64, 128, True, 4, 3, 4, **lat), C(8, 32, 64, True, 2, 3, 4, **fast)]
        if fmt == "nvfp4":  # 2 warps: 3-4% faster for qwen3-30b-a3b at M = 16 and 64, slower elsewhere (session 6)
            out += [C(16, 64, 128, False, 2, 3, 4, **fast), C(16, 64, 128, False, 2, 3, 4, pdl=True)]
        if per_expert <= 0.5:  # few active experts: split-K, 2 or 4 K parts per tile, in GEMM2 and GEMM1
            out += [C(16, 64, 64, False, 4, 3, u, split_k=s2, split_k1=s1, **fast)
                    for s1, s2, u in ((1, 2, 4), (2, 4, 2), (2, 2, 4), (4, 4, 2))]
            # the same for 8-row blocks with the weight first (the M = 1 entries' tile): GEMM1 in two K
            # parts, twice the programs of half the loop (gpt-oss-120b M = 1: 184 programs of 4 warps on
            # 132 SMs leave some schedulers two warps, session 15); not yet measured
            out += [C(8, 64, 64, True, 4, 3, u, split_k=2, split_k1=2, **fast) for u in (2, 4)]
            # or GEMM1 as stream-K on 1 or 2 programs per SM: equal work per SM whatever the tile count
            out += [C(8, 64, 64, True, 4, 3, u, split_k=2, stream_k1=p, **fast) for u in (2, 4) for p in (1, 2)]
        if per_expert <= 4:  # tiles of half the K: a wave's worth more programs where the last wave is short
            out += [C(16, 64, 128, False, 4, 3, 4, split_k=s2, split_k1=s1, **lat) for s1, s2 in ((2, 1), (2, 2))]
    if 2 <= per_expert <= 64:
        out += [C(32, 64, 64, False, 4, 3, 2), C(64, 64, 64, False, 4, 3, 2), C(32, 128, 128, False, 8, 3, 2),
                C(64, 128, 128, False, 8, 3, 2), C(32, 64, 128, False, 4, 3, 2)]
        out += [C(32, 64, 64, True, 4, 3, 2), C(64, 64, 64, True, 4, 3, 2), C(32, 64, 64, True, 4, 3, 2, tail_m=16)]
    if per_expert >= 16:
        out += [C(128, 128, 128, False, 8, 3, 2), C(128, 64, 128, False, 4, 3, 2), C(128, 128, 64, False, 8, 3, 2),
                C(64, 128, 128, False, 8, 3, 2), C(32, 128, 128, False, 8, 3, 2), C(32, 64, 128, False, 4, 3, 4),
                C(32, 128, 64, False, 4, 3, 2)]
        out += [C(128, 64, 64, True, 4, 3, 2), C(128, 128, 128, True, 8, 3, 2), C(64, 128, 128, True, 8, 3, 2),
                C(64, 64, 64, True, 4, 3, 2), C(64, 64, 64, True, 4, 4, 2), C(64, 64, 64, True, 4, 3, 4),
                C(64, 128, 128, True, 8, 3, 4)]
        # tail blocks: an expert's last rows in a block of 32 or 64 rows, not a mostly empty one of 64 or 128
        out += [C(128, 64, 64, True, 4, 3, 2, tail_m=32), C(128, 64, 64, True, 4, 3, 2, tail_m=64),
                C(128, 128, 128, True, 8, 3, 2, tail_m=64), C(64, 64, 64, True, 4, 3, 2, tail_m=32),
                C(64, 64, 64, True, 4, 4, 2, tail_m=32), C(64, 128, 128, True, 8, 3, 2, tail_m=32)]
    out = list(dict.fromkeys(replace(c, scale_words=True) for c in out))
    # each also with the slots' rows of y in bf16 (KernelConfig.y_bf16; session 16, an H200: 0.93-0.99x
    # the time at M = 64..8192 for the three presets, 1.00x for gpt-oss-120b at 8192): from 2 tokens per
    # expert all without split-K, below that those that are then batch-invariant (the family's rows are bf16)
    twins = [replace(c, y_bf16=True) for c in out if c.split_k == 1]
    out = list(dict.fromkeys(out + [c for c in twins if per_expert >= 2 or invariant(c)]))
    if batch_invariant:
        return [c for c in out if invariant(c)]
    if per_expert >= 16:
        # 256-column tiles: half the gathered activation rows that 128-column ones read from the L2
        # per weight byte (kimi-k2.5 M = 4096: 11 GB of them at 128 columns in GEMM1); the register
        # counts fit without spills (CPU SASS: GEMM1 64 x 256 and GEMM2 128 x 256, int4 and nvfp4,
        # at most 255); not yet measured
        wide = dict(scale_words=True, y_bf16=True)
        out += [C(128, 128, 256, True, 8, 3, 2, **wide), C(128, 128, 256, True, 8, 3, 2, tail_m=64, **wide),
                C(64, 256, 256, True, 8, 3, 2, tail_m=32, **wide), C(128, 64, 256, True, 8, 3, 2, tail_m=32, **wide)]
    if padded is not None:
        out = [c for c in out if c.problem_with(fmt, *padded) is None]
    return out


__all__ = ["ENV_VAR", "SHIPPED", "USER_TABLE", "candidates", "config_for", "default_config", "invariant",
           "kernel_config", "load_configs", "padded_sizes", "validate_entry", "versions", "wgmma", "write_configs"]
