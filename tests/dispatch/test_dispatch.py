"""qmoe.dispatch: per-M selection from a tuning table, the layout budget, fallbacks, explain."""

import pytest
import torch

import qmoe
from qmoe import dispatch, tuning
from qmoe.backends import Prepared, Support
from qmoe.backends.base import Backend
from qmoe.dispatch import plan as plan_module
from qmoe.tuning.buckets import bucket_ranges
from qmoe.tuning.store import entry_key

from conftest import random_weights, small_spec

BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
# decode: "fast_decode" wins; prefill (>= 1024): "fast_prefill" wins by far; "slow" never wins
TIMES = {
    "fast_decode": dict(zip(BUCKETS, (50, 120, 280, 600, 700, 1200, 2300, 3800))),
    "fast_prefill": dict(zip(BUCKETS, (80, 165, 380, 785, 950, 900, 1500, 2500))),
    "slow": dict(zip(BUCKETS, (900, 3600, 11000, 25000, 31000, 31000, 32000, 34000))),
}


# --- the pure selection logic -----------------------------------------------------------------
def test_bucket_ranges_split_at_geometric_midpoints():
    assert bucket_ranges(BUCKETS) == [(0, 1), (3, 4), (9, 16), (33, 64), (129, 256), (513, 1024),
                                               (2049, 4096), (5793, 8192)]


def test_two_winners_keep_two_layouts_when_they_fit():
    c = dispatch.choose_layouts(TIMES, {"fast_decode": 100, "fast_prefill": 110, "slow": 0}, budget=210)
    assert c.kept == ["fast_decode", "fast_prefill"]  # decode winner first
    assert c.assignment == {1: "fast_decode", 4: "fast_decode", 16: "fast_decode", 64: "fast_decode",
                            256: "fast_decode", 1024: "fast_prefill", 4096: "fast_prefill", 8192: "fast_prefill"}
    assert c.note.startswith("kept 2 layouts")


def test_over_budget_keeps_the_single_layout_that_loses_least():
    sizes = {"fast_decode": 100, "fast_prefill": 110, "slow": 0}
    c = dispatch.choose_layouts(TIMES, sizes, budget=209)
    # fast_decode alone: loss = log(1200/900) + log(2300/1500) + log(3800/2500) = 1.13;
    # fast_prefill alone: log(80/50) + log(165/120) + log(380/280) + log(785/600) + log(950/700) = 1.67
    assert c.kept == ["fast_decode"]
    assert set(c.assignment.values()) == {"fast_decode"}
    assert "max_layout_bytes" in c.note and "210 B > max_layout_bytes 209 B" in c.note
    # the weighting is by how much slower, not by a count: make prefill's wins huge and it is kept instead
    skewed = dict(TIMES, fast_prefill={**TIMES["fast_prefill"], 1024: 100, 4096: 200, 8192: 300})
    assert dispatch.choose_layouts(skewed, sizes, budget=0).kept == ["fast_prefill"]


def test_a_free_second_layout_still_needs_a_real_gain():
    # "slow" costs no bytes but never wins; "tie" wins one bucket by 2%: not worth a second layout
    times = {"a": {1: 100.0, 64: 200.0}, "tie": {1: 98.0, 64: 300.0}}
    c = dispatch.choose_layouts(times, {"a": 10, "tie": 10}, budget=None)
    assert c.kept == ["a"] and "not worth a second layout" in c.note
    c = dispatch.choose_layouts({"a": {1: 100.0, 64: 200.0}}, {}, budget=0)
    assert c.kept == ["a"] and c.note == "kept 1 layout: a (fastest at every measured bucket)"


def test_buckets_a_kept_backend_did_not_measure_take_the_nearest_choice():
    times = {"a": {1: 10.0, 16: 30.0}, "b": {1: 50.0, 16: 60.0, 4096: 900.0}}
    c = dispatch.choose_layouts(times, {"a": 1, "b": 1}, budget=2)
    assert c.kept == ["a", "b"]  # b is the only one measured at 4096
    assert c.assignment == {1: "a", 16: "a", 4096: "b"}
    with pytest.raises(ValueError, match="times_us"):
        dispatch.choose_layouts({"a": {}}, {}, None)


# --- make_plan with a synthetic table and fake backends -----------------------------------------
class FakeBackend(Backend):
    formats = qmoe.FORMATS

    def __init__(self, name, layout_bytes, ok=True, reason=""):
        self.name, self.layout_bytes, self.ok, self.reason = name, layout_bytes, ok, reason
        self.prepared = 0

    def _supports(self, spec, fmt, device):
        return Support(self.ok, self.reason or "fine")

    def _prepare(self, spec, weights):
        self.prepared += 1
        return Prepared(self.name, spec, weights.format, weights.device,
                        {"blob": torch.empty(self.layout_bytes, dtype=torch.uint8)})


@pytest.fixture
def setup(monkeypatch):
    spec = small_spec()
    weights = random_weights(spec)
    n = weights.nbytes
    fakes = {"fast_decode": FakeBackend("fast_decode", n), "fast_prefill": FakeBackend("fast_prefill", n),
             "slow": FakeBackend("slow", 0)}

    def get_backend(name):
        if name not in fakes:  # what registry.get_backend says for a module that fails to import
            raise ValueError(f"backend: {name} is not available here (ModuleNotFoundError: "
                             f"No module named 'qmoe.backends.{name}')")
        return fakes[name]

    monkeypatch.setattr(plan_module, "get_backend", get_backend)
    key, entry = tuning.make_entry(tuning.environment("cpu"), weights.format, spec, TIMES,
                                   layout_bytes={k: b.layout_bytes for k, b in fakes.items()},
                                   excluded={"flashinfer_trtllm": "needs SM100"})
    return spec, weights, fakes, {**tuning.TABLE.empty(), "entries": {key: entry}}


def test_plan_keeps_decode_and_prefill_winners_and_explains(setup):
    spec, weights, fakes, table = setup
    plan = dispatch.make_plan(spec, weights, tuning_table=table)
    assert set(plan.prepared) == {"fast_decode", "fast_prefill"}
    assert fakes["slow"].prepared == 0
    got = {m: plan.backend_for(m) for m in (1, 2, 3, 8, 9, 255, 512, 513, 2048, 2049, 100000)}
    assert got == {1: "fast_decode", 2: "fast_decode", 3: "fast_decode", 8: "fast_decode", 9: "fast_decode",
                   255: "fast_decode", 512: "fast_decode", 513: "fast_prefill", 2048: "fast_prefill",
                   2049: "fast_prefill", 100000: "fast_prefill"}
    text = plan.explain(20)
    assert text.startswith("M=20: fast_decode (measured at M=16 on cpu: fast_decode 280.0 us, "
                           "fast_prefill 380.0 us, slow 11000.0 us)")
    assert "kept 2 layouts: fast_decode and fast_prefill" in text
    assert "budget 2.5 x the canonical weights" in text
    assert "flashinfer_trtllm: needs SM100 (when tuned)" in text


def test_default_budget_is_two_and_a_half_canonical_sizes(setup):
    spec, weights, fakes, table = setup
    n = weights.nbytes
    entry = next(iter(table["entries"].values()))
    entry["layout_bytes"].update(fast_decode=int(1.2 * n), fast_prefill=int(1.2 * n))
    fakes["fast_decode"].layout_bytes = fakes["fast_prefill"].layout_bytes = int(1.2 * n)
    assert len(dispatch.make_plan(spec, weights, tuning_table=table).prepared) == 2  # 2.4 x fits
    entry["layout_bytes"].update(fast_decode=int(1.3 * n), fast_prefill=int(1.3 * n))
    fakes["fast_decode"].layout_bytes = fakes["fast_prefill"].layout_bytes = int(1.3 * n)
    plan = dispatch.make_plan(spec, weights, tuning_table=table)  # 2.6 x does not
    assert list(plan.prepared) == ["fast_decode"]
    assert plan.backend_for(4096) == "fast_decode"
    text = plan.explain(4096)
    assert "fast_prefill is faster here but its layout is not kept" in text
    assert "would run faster but need" in text and "max_layout_bytes" in text


def test_explicit_budget_and_bad_budget(setup):
    spec, weights, fakes, table = setup
    plan = dispatch.make_plan(spec, weights, max_layout_bytes=weights.nbytes, tuning_table=table)
    assert list(plan.prepared) == ["fast_decode"] and "budget given" in plan.explain(1)
    with pytest.raises(ValueError, match="max_layout_bytes: expected None or an int >= 0, got -1"):
        dispatch.make_plan(spec, weights, max_layout_bytes=-1, tuning_table=table)


def test_layouts_bigger_than_the_table_said_drop_the_second(setup):
    spec, weights, fakes, table = setup
    fakes["fast_prefill"].layout_bytes = 3 * weights.nbytes  # the table still says 1x
    plan = dispatch.make_plan(spec, weights, tuning_table=table)
    assert list(plan.prepared) == ["fast_decode"]
    assert "with fast_prefill the prepared layouts took" in plan.explain(1)


def test_unusable_backends_are_excluded_with_their_reason(setup):
    spec, weights, fakes, table = setup
    fakes["fast_prefill"].ok, fakes["fast_prefill"].reason = False, "needs SM90; this GPU is SM80"
    entry = next(iter(table["entries"].values()))
    entry["times_us"]["gone"] = {"1": 1.0}  # measured once, its module is missing now
    plan = dispatch.make_plan(spec, weights, tuning_table=table)
    assert list(plan.prepared) == ["fast_decode"]
    assert plan.backend_for(8192) == "fast_decode"
    text = plan.explain(8192)
    assert "fast_prefill 2500.0 us (excluded)" in text
    assert "fast_prefill: needs SM90; this GPU is SM80" in text
    assert "gone: gone is not available here (ModuleNotFoundError: No module named 'qmoe.backends.gone')" in text


def test_no_entry_or_stale_entry_falls_back_to_static_rules(setup, monkeypatch):
    spec, weights, fakes, table = setup
    monkeypatch.setattr(plan_module, "STATIC_ORDER", ("missing", "slow"))
    plan = dispatch.make_plan(spec, weights, tuning_table=tuning.TABLE.empty())
    assert list(plan.prepared) == ["slow"]
    text = plan.explain(64)
    assert text.startswith("M=64: slow (static rule: first usable of missing, slow; excluded: missing: missing is "
                           "not available here (ModuleNotFoundError")
    assert "no tuning entry for this GPU, format mxfp4 and shape (run `qmoe tune`)" in text

    (_, entry), = table["entries"].items()
    env = tuning.environment("cpu")
    env["versions"] = dict(env["versions"], triton="0.1")
    entry["versions"] = env["versions"]
    stale = {**tuning.TABLE.empty(),
             "entries": {entry_key(tuning.problem_key(env, "mxfp4", tuning.shape_of(spec)), env["versions"]): entry}}
    with pytest.warns(UserWarning, match=r"ignoring the entry .* triton 0\.1"):
        plan = dispatch.make_plan(spec, weights, tuning_table=stale)
    assert list(plan.prepared) == ["slow"]


def test_moe_auto_reads_the_table_named_by_the_env_var(tmp_path, monkeypatch):
    # real backends: reference is measured; triton (no GPU here) was excluded when tuned
    spec = small_spec()
    weights = random_weights(spec)
    key, entry = tuning.make_entry(tuning.environment("cpu"), "mxfp4", spec,
                                   {"reference": {1: 100.0, 64: 900.0}}, layout_bytes={"reference": 0})
    tuning.write_entries({key: entry}, tmp_path / "t.json")
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "t.json"))
    moe = qmoe.MoE(spec, weights)
    assert moe.backend_for(5) == "reference"
    assert moe.explain(5).startswith("M=5: reference (measured at M=1 on cpu: reference 100.0 us)")
    x = torch.randn(5, spec.hidden_size, dtype=torch.bfloat16)
    out = moe(x, torch.randn(5, spec.num_experts))
    assert out.shape == (5, spec.hidden_size) and torch.isfinite(out).all()


def test_a_second_layout_that_fails_to_prepare_leaves_the_first(setup):
    spec, weights, fakes, table = setup

    def out_of_memory(spec, weights):
        raise MemoryError("no room")

    fakes["fast_prefill"]._prepare = out_of_memory
    plan = dispatch.make_plan(spec, weights, tuning_table=table)
    assert list(plan.prepared) == ["fast_decode"] and plan.backend_for(8192) == "fast_decode"
    assert "kept 1 layout: fast_decode; preparing fast_prefill raised MemoryError: no room" in plan.explain(8192)


def test_a_malformed_entry_falls_back_to_static_rules(setup, monkeypatch):
    spec, weights, fakes, table = setup
    monkeypatch.setattr(plan_module, "STATIC_ORDER", ("slow",))
    entry = next(iter(table["entries"].values()))
    entry["times_us"]["fast_decode"]["1"] = "fast"
    with pytest.warns(UserWarning, match=r"ignoring the malformed entry .*times_us\['fast_decode'\]: could not "
                                         r"convert string to float: 'fast'"):
        plan = dispatch.make_plan(spec, weights, tuning_table=table)
    assert list(plan.prepared) == ["slow"]
    assert "no tuning entry for this GPU" in plan.explain(1)


def test_the_plan_resolves_each_m_once(setup):
    """The hot path: a call with a token count seen before costs a dict lookup, not a backend
    lookup and a config construction (issue: importlib lookup plus config on every call)."""
    spec, weights, fakes, table = setup
    plan = dispatch.make_plan(spec, weights, tuning_table=table)
    asked = []
    original = plan_module.get_backend
    plan_module.get_backend = lambda name: asked.append(name) or original(name)
    try:
        first = plan.runner(16)
        again = [plan.runner(16) for _ in range(5)]
    finally:
        plan_module.get_backend = original
    assert asked == ["fast_decode"] and all(r is first for r in again)
