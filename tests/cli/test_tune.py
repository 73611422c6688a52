"""`qmoe tune`: refusal without a GPU, measuring on the CPU into a table, kernel tuning hooks."""

import argparse
import json

import pytest

import qmoe
from qmoe import dispatch, tuning
from qmoe.backends import Support
from qmoe.backends.reference import ReferenceBackend
from qmoe.cli import common, tune

from conftest import random_weights

TINY = ["--experts", "4", "--hidden", "64", "--intermediate", "96", "--top-k", "2"]


class KernelTuner(ReferenceBackend):
    """A backend whose kernels can be tuned: records what it was asked."""

    tunable = True
    asked = []

    def tune(self, spec, fmt, ms, device, **kwargs):
        self.asked.append((spec.num_experts, fmt, tuple(ms), str(device)))
        return {"gpu": "cpu", "buckets": {1: {"config": {"block_m": 16}, "us": 1.0, "default_us": 2.0}}}


class Unsupported(ReferenceBackend):
    def _supports(self, spec, fmt, device):
        return Support(False, "needs SM90; this is a CPU")


KERNEL_TUNER, UNSUPPORTED = KernelTuner(), Unsupported()


def parse(argv):
    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    return parser.parse_args(argv)


def test_refuses_without_a_gpu_unless_allowed(capsys):
    assert tune.run(parse([*TINY, "--device", "cpu"])) == 2
    assert "qmoe tune measures on a GPU; none here" in capsys.readouterr().err


def test_tune_on_cpu_writes_an_entry_that_auto_then_uses(tmp_path, capsys):
    path = tmp_path / "t.json"
    argv = [*TINY, "--device", "cpu", "--allow-cpu", "--tokens", "4,1", "--backend", "reference,test_tune:UNSUPPORTED",
            "--reps", "3", "--warmup", "1", "--tuning-file", str(path)]
    assert tune.run(parse(argv)) == 0
    out = capsys.readouterr().out
    assert f"merged 1 entry into {path}" in out
    (key, entry), = tuning.read_table(path)["entries"].items()
    assert entry["shape"] == {"num_experts": 4, "hidden_size": 64, "intermediate_size": 96, "top_k": 2}
    assert entry["format"] == "mxfp4" and entry["gpu"] == "cpu"
    assert set(entry["times_us"]) == {"reference"} and set(entry["times_us"]["reference"]) == {"1", "4"}
    assert all(t > 0 for t in entry["times_us"]["reference"].values())
    assert entry["methods"] == {"reference": "wall"} and entry["layout_bytes"] == {"reference": 0}
    assert entry["excluded"]["test_tune:UNSUPPORTED"] == "needs SM90; this is a CPU"

    spec = qmoe.MoESpec(4, 2, 64, 96)
    plan = dispatch.make_plan(spec, random_weights(spec), tuning_table=path)
    assert plan.backend_for(2) == "reference"
    assert plan.explain(2).startswith("M=2: reference (measured at M=1 on cpu: reference ")


def test_kernels_flag_calls_backend_tune_and_reports_it(tmp_path, capsys):
    KernelTuner.asked.clear()
    argv = [*TINY, "--allow-cpu", "--device", "cpu", "--tokens", "1", "--reps", "3", "--warmup", "0",
            "--backend", "test_tune:KERNEL_TUNER", "--format", "int4", "--kernels", "--tuning-file",
            str(tmp_path / "t.json")]
    assert tune.run(parse(argv)) == 0
    assert KernelTuner.asked == [(4, "int4", (1,), "cpu")]
    out = capsys.readouterr().out
    assert 'test_tune:KERNEL_TUNER kernel tuning for custom int4: {"buckets": {"1": {"config": {"block_m": 16}, ' \
           '"default_us": 2.0, "us": 1.0}}, "gpu": "cpu", "path": null}' in out

    report = tmp_path / "kernels.json"
    assert tune.run(parse([*argv, "--kernel-report", str(report)])) == 0
    (r,) = json.loads(report.read_text())
    assert (r["problem"], r["backend"]) == ("custom int4", "test_tune:KERNEL_TUNER")
    assert r["result"]["buckets"] == {"1": {"config": {"block_m": 16}, "us": 1.0, "default_us": 2.0}}

    argv[argv.index("test_tune:KERNEL_TUNER")] = "reference"
    assert tune.run(parse(argv)) == 0
    assert "kernel tuning unavailable for custom int4: no usable backend offers it" in capsys.readouterr().out
    assert tune.run(parse([*argv[:-3], "--kernel-report", str(report)])) == 2
    assert "--kernel-report needs --kernels" in capsys.readouterr().err
    assert tune.run(parse([*argv, "--kernel-report", str(tmp_path / "no" / "such" / "r.json")])) == 2
    assert "does not exist or is not writable" in capsys.readouterr().err


def test_problems_from_arguments():
    assert [(s.name, f) for s, f in tune.problems_from_args(parse([]))] == \
        [(n, qmoe.spec.PRESET_FORMATS[n]) for n in qmoe.presets]
    got = tune.problems_from_args(parse(["--preset", "gpt-oss-20b,kimi-k2.5", "--format", "mxfp4,int4"]))
    assert [(s.name, f) for s, f in got] == [("gpt-oss-20b", "mxfp4"), ("gpt-oss-20b", "int4"),
                                             ("kimi-k2.5", "mxfp4"), ("kimi-k2.5", "int4")]
    assert len(tune.problems_from_args(parse(["--preset", "gpt-oss-20b", "--format", "all"]))) == len(qmoe.FORMATS)
    with pytest.raises(ValueError, match="expected all four together, got experts=4, hidden=64, "
                                         "intermediate=None, top-k=None"):
        tune.problems_from_args(parse(["--experts", "4", "--hidden", "64"]))
    with pytest.raises(ValueError, match=r"--top-k: routing chooses top_k distinct experts: expected at most "
                                         r"--experts \(4\), got 8"):
        tune.problems_from_args(parse(["--experts", "4", "--hidden", "64", "--intermediate", "32", "--top-k", "8"]))
    with pytest.raises(ValueError, match="--preset: expected one of"):
        tune.problems_from_args(parse(["--preset", "gpt-5"]))
    with pytest.raises(ValueError, match="--format: expected one of"):
        tune.problems_from_args(parse(["--format", "fp8"]))
    with pytest.raises(ValueError, match="--tokens: expected comma-separated integers >= 1, got '0,4'"):
        common.parse_tokens("0,4")
    assert common.parse_tokens("16,1,4") == (1, 4, 16)


def test_unknown_backend_names_are_errors_not_empty_entries(tmp_path):
    path = tmp_path / "t.json"
    argv = [*TINY, "--device", "cpu", "--allow-cpu", "--tokens", "1", "--backend", "referense",
            "--reps", "2", "--warmup", "0", "--tuning-file", str(path)]
    with pytest.raises(ValueError, match="--backend: expected one of reference, triton, .* got 'referense'"):
        tune.run(parse(argv))
    assert not path.exists()


def test_a_partial_tune_merges_into_the_entry(tmp_path):
    """Tuning one backend, or a few token counts, keeps the other measurements (issue: a partial
    run used to replace the whole entry, and auto then lost the other backends' times)."""
    path = tmp_path / "t.json"
    base = [*TINY, "--device", "cpu", "--allow-cpu", "--reps", "2", "--warmup", "0", "--tuning-file", str(path)]
    assert tune.run(parse([*base, "--tokens", "1,4", "--backend", "reference"])) == 0
    assert tune.run(parse([*base, "--tokens", "16", "--backend", "reference"])) == 0
    assert tune.run(parse([*base, "--tokens", "1", "--backend", "test_tune:KERNEL_TUNER"])) == 0
    (entry,) = tuning.read_table(path)["entries"].values()
    assert set(entry["times_us"]["reference"]) == {"1", "4", "16"}
    assert set(entry["times_us"]["test_tune:KERNEL_TUNER"]) == {"1"}


@pytest.mark.parametrize("where", ["missing_folder", "folder"])
def test_an_unwritable_tuning_file_fails_before_measuring(tmp_path, where, monkeypatch):
    target = tmp_path / "no" / "such" / "t.json" if where == "missing_folder" else tmp_path
    if where == "missing_folder":  # a missing folder is created; one that cannot be is an error
        (tmp_path / "no").write_text("a file where a folder should be")
    measured = []
    monkeypatch.setattr(tune, "tune_problem", lambda *a, **k: measured.append(1))
    with pytest.raises(ValueError, match="qmoe-tuning table .*(is a folder|cannot create folder)"):
        tune.run(parse([*TINY, "--device", "cpu", "--allow-cpu", "--tokens", "1", "--backend", "reference",
                        "--tuning-file", str(target)]))
    assert measured == []


def test_tune_replaces_a_damaged_table(tmp_path):
    path = tmp_path / "t.json"
    path.write_bytes(b"\xff\xfe not json")
    with pytest.warns(UserWarning, match="replacing damaged qmoe-tuning table"):
        assert tune.run(parse([*TINY, "--device", "cpu", "--allow-cpu", "--tokens", "1", "--backend", "reference",
                               "--reps", "2", "--warmup", "0", "--tuning-file", str(path)])) == 0
    assert json.loads(path.read_text())["kind"] == "qmoe-tuning"
