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
