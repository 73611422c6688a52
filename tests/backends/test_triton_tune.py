"""Kernel-config tuning of the triton backend, run through `qmoe tune --kernels` (interpreter on
a CPU): the winners land in the user's table, and prepare() then launches with them."""

import argparse
import json

import torch

import qmoe
from qmoe.backends import get_backend
from qmoe.backends.triton import configs
from qmoe.cli import tune
from qmoe.kernels.moe import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_tune_kernels_writes_the_table_and_prepare_uses_it(tmp_path, monkeypatch):
    table = tmp_path / "triton_configs.json"
    monkeypatch.setenv("QMOE_TRITON_CONFIGS", str(table))
    # batch-invariant (the weight first, wgmma, bf16 rows); H = 64 leaves GEMM1 a remainder: the tuner
    # times it with whole_k
    only = configs.with_whole_k(KernelConfig(16, 64, 64, True, 4, 2, 2, y_bf16=True), "mxfp4",
                                64, 128)
    assert only.whole_k
    monkeypatch.setattr(configs, "candidates",
                        lambda m, k, e, fmt="mxfp4", padded=None: [configs.default_config(m, k, e, fmt), only])
    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    args = parser.parse_args(["--experts", "4", "--hidden", "64", "--intermediate", "64", "--top-k", "2",
                              "--format", "mxfp4", "--backend", "triton", "--kernels", "--tokens", "3",
                              "--reps", "2", "--warmup", "0", "--allow-cpu", "--device", DEVICE,
                              "--tuning-file", str(tmp_path / "tuning.json")])
    assert tune.run(args) == 0
    saved = json.loads(table.read_text())
    assert saved["kind"] == "qmoe-triton-configs" and saved["schema"] == 2
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    entries = {("batch-invariant" in k): e for k, e in saved["entries"].items()}
    assert len(saved["entries"]) == 2 and set(entries) == {True, False}  # both modes' winners
    for key in saved["entries"]:
        assert key.startswith(f"{gpu}|mxfp4|E4 H64 I64 k2|") and f"triton {configs.versions()['triton']}" in key
    assert all(set(e["buckets"]) == {"3"} for e in entries.values())  # the tuned M is a bucket of its own
    assert configs.invariant(KernelConfig(**entries[True]["buckets"]["3"]))
    entry = entries[False]  # the backend's default mode (batch invariance is a switch)
    winner = KernelConfig(**entry["buckets"]["3"])
    assert winner in (configs.with_whole_k(configs.default_config(3, 2, 4), "mxfp4", 64, 128), only)

    spec = qmoe.MoESpec(4, 2, 64, 64)
    g = torch.Generator().manual_seed(0)
    w = qmoe.ExpertWeights.from_float(torch.randn(4, 128, 64, generator=g), torch.randn(4, 64, 64, generator=g),
                                      "mxfp4").to(DEVICE)
    b = get_backend("triton")
    prepared = b.prepare(spec, w)
    # one bucket rule: every M runs the nearest measured bucket, here the only one
    assert all(b.config_for(prepared, m) == winner for m in (1, 2, 3, 100, 4096))


def test_the_interleaved_final_round_picks_the_winners(monkeypatch):
    """The first pass ranks A < B < C < D (D the only batch-invariant one, so it joins the
    finalists); the interleaved round, the default beside them, says C is fastest and B fails:
    C and D win, with their final-round times, B is marked, and the default's time comes from
    the same round."""
    import qmoe.timing as timing
    from qmoe.backends.triton import tune as ktune

    a, b_, c = (KernelConfig(16, 32, 32, False, 2, 2, 2, split_k=2), KernelConfig(16, 32, 32, False, 2, 2, 4,
                                                                                 split_k=2),
                KernelConfig(32, 32, 32, False, 2, 2, 2, split_k=2))
    d = KernelConfig(16, 64, 64, True, 4, 2, 2, y_bf16=True)
    base = configs.default_config(3, 2, 4)
    # as the tuner times them (H = 64 leaves GEMM1 a remainder: whole_k where it can run)
    a, b_, c, d, base = (configs.with_whole_k(x, "mxfp4", 64, 128) for x in (a, b_, c, d, base))
    first = {a: 10.0, b_: 11.0, c: 12.0, d: 13.0, base: 20.0}
    final = {a: 9.0, c: 7.0, d: 8.5, base: 15.0}
    monkeypatch.setattr(configs, "candidates", lambda m, k, e, fmt="mxfp4", padded=None: [base, a, b_, c, d])
    spec, backend = qmoe.MoESpec(4, 2, 64, 64), get_backend("triton")
    seen = []

    def fake_measure(fn, **kw):   # the first pass: the config of the call being timed is the last one run
        fn()
        return {"median_us": first[seen[-1]]}

    def fake_many(fns, **kw):
        for fn in fns.values():
            fn()
        ran = seen[-len(fns):]
        return {n: ({"median_us": final[cfg]} if cfg in final else {"error": "RuntimeError: no graph"})
                for n, cfg in zip(fns, ran)}

    real_forward = backend.forward
    monkeypatch.setattr(backend, "forward", lambda *args, config=None, **kw: (seen.append(config),
                                                                            real_forward(*args, config=config, **kw))[1])
    monkeypatch.setattr(timing, "measure", fake_measure)
    monkeypatch.setattr(timing, "measure_many", fake_many)
    res = ktune.tune(backend, spec, "mxfp4", [3], DEVICE, write=False, reps=1)
    bucket = res["buckets"][3]
    assert (bucket["config"], bucket["us"]) == (c, 7.0)
    assert (bucket["invariant_config"], bucket["invariant_us"]) == (d, 8.5)
    assert bucket["default_us"] == 15.0
    got = {KernelConfig(**t["config"]): (t.get("final_us"), "final_error" in t) for t in bucket["tried"]}
    assert got == {a: (9.0, False), b_: (None, True), c: (7.0, False), d: (8.5, False), base: (None, False)}


def test_an_invariant_candidate_with_other_bits_never_wins_the_invariant_entry(monkeypatch):
    """Two members of the batch-invariant family by configuration; the faster one gives other bits
    than the family's default on these inputs (within the accuracy bound): it may win the default
    entry, never the batch-invariant one, and its entry says why."""
    import qmoe.timing as timing
    from qmoe.backends.triton import tune as ktune

    plain = (KernelConfig(16, 64, 64, True, 4, 2, 2, y_bf16=True),
             KernelConfig(16, 64, 128, True, 4, 2, 2, y_bf16=True), configs.default_config(3, 2, 4))
    good, odd, base = (configs.with_whole_k(x, "mxfp4", 64, 128) for x in plain)
    assert configs.invariant(good) and configs.invariant(odd)
    times = {good: 9.0, odd: 5.0, base: 20.0}
    monkeypatch.setattr(configs, "candidates", lambda m, k, e, fmt="mxfp4", padded=None: [base, good, odd])
    spec, backend = qmoe.MoESpec(4, 2, 64, 64), get_backend("triton")
    seen = []
    real_forward = backend.forward

    def forward(*args, config=None, **kw):
        seen.append(config)
        out = real_forward(*args, config=config, **kw)
        return out.mul_(1 + 2 ** -7) if config == odd else out   # one bf16 step off: other bits

    monkeypatch.setattr(backend, "forward", forward)
    monkeypatch.setattr(timing, "measure", lambda fn, **kw: (fn(), {"median_us": times[seen[-1]]})[1])
    monkeypatch.setattr(timing, "measure_many", lambda fns, **kw: {
        n: (fn(), {"median_us": times[seen[-1]]})[1] for n, fn in fns.items()})
    res = ktune.tune(backend, spec, "mxfp4", [3], DEVICE, write=False, reps=1)
    bucket = res["buckets"][3]
    assert bucket["config"] == odd and bucket["invariant_config"] == good
    tried = {KernelConfig(**t["config"]): t for t in bucket["tried"]}
    assert "not_invariant" in tried[odd] and "not_invariant" not in tried[good]


def test_candidates_fit_every_preset_and_the_shipped_table_is_usable():
    """Every candidate the tuner would time fits the preset's padded shape and format (so none is
    wasted on a refusal; only 256-column tiles are left out where they do not divide it), loads
    scale words, and the batch-invariant lists hold only invariant
    configurations; every entry of the shipped table passes the load-time check and its
    batch-invariant entries are invariant."""
    from qmoe.spec import PRESET_FORMATS

    for name, fmt in PRESET_FORMATS.items():
        spec = qmoe.presets[name]
        Hp, Ip = configs.padded_sizes({"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size})
        for m in (1, 4, 16, 64, 256, 1024, 4096, 8192):
            for inv in (False, True):
                every = configs.candidates(m, spec.top_k, spec.num_experts, fmt, inv)
                cands = configs.candidates(m, spec.top_k, spec.num_experts, fmt, inv, padded=(Hp, Ip))
                assert cands and len(set(every)) == len(every), (name, m, inv)
                # only the 256-column tiles may not fit a shape (gpt-oss's 2944), and those are left out
                assert cands == [c for c in every if c.problem_with(fmt, Hp, Ip) is None], (name, m, inv)
                assert all(256 in (c.block_n1, c.block_n2) for c in every if c not in cands), (name, m, inv)
                prefill = m * spec.top_k / spec.num_experts >= 2
                # bf16 rows: every invariant candidate (the family's rows), and at decode only those
                assert all(c.y_bf16 for c in cands) if inv else any(c.y_bf16 for c in cands), (name, m, inv)
                assert prefill or all(configs.invariant(c) for c in cands if c.y_bf16), (name, m, inv)
                for c in cands:
                    assert c.problem_with(fmt, Hp, Ip) is None, (name, m, c)
                    assert c.scale_words and (configs.invariant(c) or not inv), (name, m, c)
    shipped = configs.USER_TABLE.read(configs.SHIPPED)["entries"]
    assert shipped
    for key, entry in shipped.items():
        assert configs.validate_entry(entry) is None, key
        if "|batch-invariant|" in key:
            assert all(configs.invariant(configs.kernel_config(d)) for d in entry["buckets"].values()), key


def test_with_whole_k_only_where_a_remainder_loop_would_run():
    """whole_k joins a candidate where GEMM1's hidden size leaves a remainder after the unrolled loop
    and the padded K is whole loop iterations: gpt-oss's 2880 (46 chunks of mxfp4 padded, 45 inside
    H) at k_unroll 2, not at 4 (46 is no multiple), never for kimi's 7168 (no remainder)."""
    two, four = KernelConfig(64, 64, 64, True, 4, 3, 2), KernelConfig(64, 64, 64, True, 4, 3, 4)
    assert configs.with_whole_k(two, "mxfp4", 2880, 2944).whole_k
    assert not configs.with_whole_k(four, "mxfp4", 2880, 2944).whole_k
    assert not configs.with_whole_k(two, "int4", 7168, 7168).whole_k
    assert configs.with_whole_k(two, "nvfp4", 2880, 2944).whole_k    # 92 chunks of 32 padded, 90 inside H
    split = KernelConfig(16, 64, 64, False, 4, 3, 2, split_k1=2)
    assert configs.with_whole_k(split, "mxfp4", 2880, 2944) == split
    for c in (configs.with_whole_k(two, "mxfp4", 2880, 2944), configs.with_whole_k(two, "nvfp4", 2880, 2944)):
        assert c.problem_with("mxfp4", 2944, 2944) is None
