"""qmoe.timing: the median and method of `measure`, rep capping, the CPU roofline."""

import types

import pytest

from qmoe import timing


class FakeClock:
    """perf_counter(_ns) that only moves when the timed function runs."""

    def __init__(self, durations_us):
        self.durations = list(durations_us)
        self.now_ns = 0
        self.calls = 0

    def fn(self):
        self.now_ns += int(self.durations[self.calls % len(self.durations)] * 1000)
        self.calls += 1

    def install(self, monkeypatch):
        fake = types.SimpleNamespace(perf_counter_ns=lambda: self.now_ns, perf_counter=lambda: self.now_ns / 1e9)
        monkeypatch.setattr(timing, "time", fake)


def test_measure_cpu_median_of_timed_calls_after_warmup(monkeypatch):
    # warm-up calls take 1000 us (must be ignored); timed calls 7, 3, 5, 100, 4 us -> median 5
    clock = FakeClock([1000, 1000, 7, 3, 5, 100, 4])
    clock.install(monkeypatch)
    r = timing.measure(clock.fn, device="cpu", warmup=2, reps=5)
    assert clock.calls == 7
    assert r == {"median_us": 5.0, "min_us": 3.0, "reps": 5, "method": "wall", "flush_l2": False, "note": None}


def test_measure_caps_reps_by_max_seconds(monkeypatch):
    clock = FakeClock([200_000])  # 0.2 s per call
    clock.install(monkeypatch)
    r = timing.measure(clock.fn, device="cpu", warmup=2, reps=50, max_seconds=1.0)
    assert r["reps"] == 5 and clock.calls == 7
    r = timing.measure(clock.fn, device="cpu", warmup=1, reps=50, max_seconds=0.1)
    assert r["reps"] == 3  # never fewer than 3, so the median means something


def test_measure_rejects_bad_counts():
    with pytest.raises(ValueError, match="warmup, reps"):
        timing.measure(lambda: None, device="cpu", reps=0)
    with pytest.raises(ValueError, match="warmup, reps"):
        timing.measure(lambda: None, device="cpu", warmup=-1)


def test_roofline_on_cpu_is_not_modelled():
    r = timing.roofline("cpu")
    assert r["copy_GBps"] is None and r["bf16_TFLOPs"] is None and r["read_GBps"] is None
    assert r["device"] == "cpu" and r["gemm_size"] == 8192 and r["copy_bytes"] == 4 << 30
    assert "eager" in r["method"]
    assert timing.floor_us(1000, 10, r) is None


def test_floor_is_read_bandwidth_or_compute_whichever_is_larger():
    roof = {"read_GBps": 4000.0, "copy_GBps": 3000.0, "bf16_TFLOPs": 800.0}
    assert timing.floor_us(4_000_000, 1, roof) == (1.0, "memory")  # 4 MB at 4 TB/s: 1 us (not the copy rate)
    assert timing.floor_us(1, 8_000_000_000, roof) == (10.0, "compute")  # 8 GFLOP at 800 TFLOP/s
    assert timing.floor_us(4_000_000, 1, {"copy_GBps": 2000.0, "bf16_TFLOPs": 800.0}) == (2.0, "memory")


def test_the_l2_is_flushed_by_default():
    import inspect

    assert inspect.signature(timing.measure).parameters["flush_l2"].default is True


def test_interleaved_order_rotates_and_respects_each_reps():
    order = timing.interleaved_order({"a": 3, "b": 3, "c": 1})
    assert order == ["a", "b", "c", "b", "a", "a", "b"]  # round 1 starts at b (c has no 2nd rep)
    for name, n in (("a", 3), ("b", 3), ("c", 1)):
        assert order.count(name) == n
    long = timing.interleaved_order({"a": 6, "b": 6, "c": 6})
    after = {(long[i], long[i + 1]) for i in range(len(long) - 1)}
    assert ("a", "b") in after and ("b", "a") in after, "no name always follows the same one"
    assert timing.interleaved_order({}) == []


def test_measure_many_reports_a_failing_fn_and_times_the_others(monkeypatch):
    clock = FakeClock([10])
    clock.install(monkeypatch)

    def broken():
        raise RuntimeError("out of memory\nsecond line")

    r = timing.measure_many({"ok": clock.fn, "bad": broken}, device="cpu", warmup=1, reps=3)
    assert list(r) == ["ok", "bad"]
    assert r["ok"]["median_us"] == 10.0 and r["ok"]["reps"] == 3
    assert r["bad"] == {"error": "RuntimeError: out of memory"}
    with pytest.raises(ValueError, match="warmup, reps"):
        timing.measure_many({"ok": clock.fn}, device="cpu", reps=0)


@pytest.mark.gpu
def test_measure_many_on_the_gpu_captures_and_interleaves():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = torch.randn(1 << 20, device="cuda")
    small, large = torch.empty_like(a[:1024]), torch.empty_like(a)
    r = timing.measure_many({"small": lambda: torch.mul(a[:1024], 2, out=small),
                             "large": lambda: torch.mul(a, 2, out=large)}, device="cuda", reps=20)
    for name in ("small", "large"):
        assert r[name]["method"] == "cuda_graph" and r[name]["interleaved"] and r[name]["reps"] == 20
    assert torch.equal(large, a * 2), "the replays ran the calls"


def test_measure_many_gpu_path_names_the_failing_fn(monkeypatch):
    """The CUDA branch's bookkeeping, with the GPU steps replaced: a warm-up that raises and a
    timed call that raises are reported on their own names, the others still timed."""
    import contextlib

    import torch

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(timing, "_flush_buffer", lambda flush: None)

    def ready(fn, warmup, reps, use_graph, max_seconds):
        fn()  # the warm-up
        return fn, "cuda_graph", None, reps

    def event_times(runs, scratch):
        for run, _ in runs.values():
            run()
        return {n: [2.0, 1.0, 3.0] for n in runs}

    monkeypatch.setattr(timing, "_ready_cuda", ready)
    monkeypatch.setattr(timing, "_interleaved_event_times", event_times)
    calls = {"replay": 0}

    def fails_in_warmup():
        raise RuntimeError("CUDA out of memory")

    def fails_when_timed():
        calls["replay"] += 1
        if calls["replay"] > 1:  # the warm-up passes, the timed call does not
            raise RuntimeError("illegal memory access")

    r = timing.measure_many({"a": lambda: None, "w": fails_in_warmup, "t": fails_when_timed, "b": lambda: None},
                            device="cuda", reps=3)
    assert list(r) == ["a", "w", "t", "b"]
    assert r["w"] == {"error": "RuntimeError: CUDA out of memory"}
    assert r["t"] == {"error": "RuntimeError: illegal memory access"}
    for n in ("a", "b"):
        assert r[n]["median_us"] == 2.0 and r[n]["interleaved"] is False, "timed alone after the failure"

    def no_memory(flush):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(timing, "_flush_buffer", no_memory)
    r = timing.measure_many({"a": lambda: None}, device="cuda")
    assert r["a"]["error"].startswith("no memory for the L2 flush buffer: RuntimeError")
