"""`qmoe check`: shapes and inputs, judging one case, crash/hang isolation, --compare."""

import ctypes
import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch

import qmoe
from qmoe.backends.reference import ReferenceBackend
from qmoe.cli import check, common

TESTS = str(Path(__file__).resolve().parent)


# --- fake backends (imported as "test_check:NAME" by the worker processes too) ------------------
class Crasher(ReferenceBackend):
    """Right everywhere, except: aborts at M=5 (plain ids), segfaults at M=9 with ids of -1."""

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        M, neg = x.shape[0], bool((topk_ids < 0).any())
        if (M == 5 and not neg) or (M == 9 and neg):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from a deliberate crash
            if M == 5:
                os.abort()
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        return super().forward(prepared, x, topk_ids, topk_weights, out, shared_output)


class Hanger(ReferenceBackend):
    """Never returns at M=1 with ids of -1."""

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        if x.shape[0] == 1 and bool((topk_ids < 0).any()):
            time.sleep(3600)
        return super().forward(prepared, x, topk_ids, topk_weights, out, shared_output)


class Lazy(ReferenceBackend):
    """Forgets the last token's row."""

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        super().forward(prepared, x[:-1], topk_ids[:-1], topk_weights[:-1], out[:-1],
                        None if shared_output is None else shared_output[:-1])
        return out


class Off(ReferenceBackend):
    """Right answer times 1.05: a 5% relative error."""

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        super().forward(prepared, x, topk_ids, topk_weights, out, shared_output)
        return out.mul_(1.05)


class Rebinder(ReferenceBackend):
    """Returns a new tensor instead of writing into `out`."""

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        return super().forward(prepared, x, topk_ids, topk_weights, torch.empty_like(out), shared_output)


CRASHER, HANGER = Crasher(), Hanger()


# --- problems, cases, inputs --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(qmoe.presets))
def test_quick_and_padded_specs_keep_shapes_that_need_padding(name):
    base = qmoe.presets[name]
    for spec in (check.quick_spec(base), check.padded_spec(base)):
        for d in (spec.hidden_size, spec.intermediate_size):
            assert d % 32 == 0 and d % 64 != 0  # every format's block divides it; every tile must pad
        assert spec.num_experts % spec.routing.n_group == 0 and spec.num_experts >= 2 * spec.top_k
        assert (spec.top_k, spec.activation, spec.routing, spec.bias) == \
            (base.top_k, base.activation, base.routing, base.bias)
    q = check.quick_spec(base)
    assert q.hidden_size <= 256 and q.intermediate_size <= 128 and q.num_experts <= 24
    p = check.padded_spec(base)
    assert abs(p.hidden_size - base.hidden_size) <= 32 and abs(p.intermediate_size - base.intermediate_size) <= 32


def test_problems_cases_and_inputs():
    problems = check.make_problems(["deepseek-v3", "gpt-oss-20b"], None, quick=False)
    assert [p["id"] for p in problems] == ["deepseek-v3/nvfp4", "deepseek-v3-padded/nvfp4",
                                           "gpt-oss-20b/mxfp4", "gpt-oss-20b-padded/mxfp4"]
    assert check.spec_from_dict(problems[0]["spec"]) == qmoe.presets["deepseek-v3"]
    cases = check.make_cases(problems[:1])
    assert [c["id"] for c in cases] == [f"M={m}" for m in check.TOKENS] + \
        [f"M={m} ids=-1" for m in check.TOKENS[1:]] + \
        ["M=64 +shared", "M=64 NaN input", "M=64 NaN weight block", "M=64 determinism", "invariance M<=256"]
    assert [c["kind"] for c in cases[-5:]] == ["accuracy", "nan", "nan", "deterministic", "invariant"]
    assert cases[-1]["sizes"] == [1, 2, 3, 8, 16, 64, 256]
    assert check.make_cases(problems[:1], quick=True)[-1]["sizes"] == [1, 3, 16]

    spec = check.quick_spec(qmoe.presets["gpt-oss-20b"])
    case = {"id": "M=255 ids=-1", "M": 255, "neg_ids": True, "shared": False, "kind": "accuracy"}
    x, ids, w, shared = check.case_inputs(spec, case, 7, "cpu")
    assert x.shape == (255, spec.hidden_size) and x.dtype == torch.bfloat16 and shared is None
    assert ids.dtype == torch.int32 and (ids[0] == -1).all()
    neg = (ids == -1).float().mean().item()
    assert 0.15 < neg < 0.4
    for row in ids.tolist():  # distinct experts per token
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real)) and all(e < spec.num_experts for e in real)
    assert torch.allclose(w.sum(1), torch.ones(255))
    again = check.case_inputs(spec, case, 7, "cpu")
    assert torch.equal(again[0], x) and torch.equal(again[1], ids)  # same seed, same inputs

    with pytest.raises(ValueError, match="format: expected one of"):
        check.make_problems(["gpt-oss-20b"], ["fp8"])
    with pytest.raises(ValueError, match="--tokens: expected comma-separated integers >= 0, got '1,x'"):
        common.parse_tokens("1,x", minimum=0)
    with pytest.raises(ValueError, match="--tolerance: expected FMT=VALUE"):
        check.parse_tolerances(["mxfp4=0"])
    assert check.parse_tolerances(["int4=0.05"])["int4"] == 0.05
    with pytest.raises(ValueError, match="--require: expected a comma-separated subset of deterministic, "
                                         "invariant, got 'fast'"):
        check.parse_require("deterministic,fast")


# --- judging one case, in this process ------------------------------------------------------------
@pytest.fixture(scope="module")
def problem():
    spec = dataclasses.replace(check.quick_spec(qmoe.presets["gpt-oss-20b"]), num_experts=8)
    weights = qmoe.random_weights(spec, "mxfp4", "cpu", seed=3)
    return spec, weights


def judge(backend, problem, case_id, M, neg=False, shared=False, kind="accuracy", nan=None, sizes=None,
          require=()):
    spec, weights = problem
    case = {"id": case_id, "M": M, "neg_ids": neg, "shared": shared, "kind": kind, "nan": nan, "sizes": sizes}
    return check.run_case(backend, backend.prepare(spec, weights), spec, weights, case, seed=1,
                          tolerance=check.TOLERANCES["mxfp4"], require=require)


def test_reference_passes_every_kind_of_case(problem):
    ref = ReferenceBackend()
    for args in (("M=0", 0), ("M=5", 5), ("M=5 ids=-1", 5, True), ("M=5 +shared", 5, False, True)):
        r = judge(ref, problem, *args)
        assert r["status"] == "pass", r
        assert r["rel_err"] < 5e-3
    assert judge(ref, problem, "M=1 ids=-1", 1, True)["rel_err"] == 0.0  # its only token has no expert


def test_wrong_backends_fail_with_the_reason(problem):
    r = judge(Lazy(), problem, "M=6", 6)
    assert r["status"] == "fail"
    assert r["detail"] == f"{problem[0].hidden_size} of {6 * problem[0].hidden_size} output elements are NaN/Inf " \
                          "(unwritten?)"
    r = judge(Off(), problem, "M=6", 6)
    assert r["status"] == "fail" and 0.045 < r["rel_err"] < 0.055
    assert r["detail"].startswith("relative error 0.05") and r["detail"].endswith("> 0.01")
    r = judge(Rebinder(), problem, "M=6", 6)
    assert r["status"] == "fail"
    assert r["detail"].startswith("forward returned a tensor other than `out`; 576 of 576")


def test_a_raising_backend_fails_that_case():
    class Raiser(ReferenceBackend):
        def forward(self, *a, **k):
            raise RuntimeError("no kernel for this shape\nsecond line")

    spec = qmoe.MoESpec(4, 2, 32, 32)
    weights = qmoe.random_weights(spec, "int4", "cpu")
    case = {"id": "M=2", "M": 2, "neg_ids": False, "shared": False, "kind": "accuracy"}
    r = check.run_case(Raiser(), None, spec, weights, case, seed=0, tolerance=0.01)
    assert r["status"] == "fail" and r["detail"] == "forward raised RuntimeError: no kernel for this shape"


class NanDropper(ReferenceBackend):
    """Right, except that NaN never comes out (as tl.minimum(nan, limit) did in the triton kernel)."""

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        super().forward(prepared, x, topk_ids, topk_weights, out, shared_output)
        return out.nan_to_num_(nan=-42.0)


class Flaky(ReferenceBackend):
    """A different last bit on every call (not deterministic), and batch-size dependent."""

    calls = 0

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None):
        super().forward(prepared, x, topk_ids, topk_weights, out, shared_output)
        Flaky.calls += 1
        return out.mul_(1 + (Flaky.calls % 3) * 2 ** -7 + x.shape[0] * 2 ** -8)


@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_cases_need_nan_exactly_where_the_reference_has_it(problem, where):
    r = judge(ReferenceBackend(), problem, f"M=7 NaN {where}", 7, kind="nan", nan=where)
    assert r["status"] == "pass", r
    r = judge(NanDropper(), problem, f"M=7 NaN {where}", 7, kind="nan", nan=where)
    assert r["status"] == "fail" and "the backend dropped a NaN" in r["detail"]
    r = judge(Off(), problem, f"M=7 NaN {where}", 7, kind="nan", nan=where)  # NaN kept, the rest wrong
    assert r["status"] == "fail" and "relative error outside the NaN rows" in r["detail"]


def test_properties_are_reported_and_fail_only_when_required(problem):
    sizes = [1, 3, 8]
    for kind, case_id in (("deterministic", "M=8 determinism"), ("invariant", "invariance M<=8")):
        r = judge(Flaky(), problem, case_id, 8, kind=kind, sizes=sizes)
        assert r["status"] == "no", r
        assert "rows differing" in r["detail"]
        assert judge(Flaky(), problem, case_id, 8, kind=kind, sizes=sizes, require=(kind,))["status"] == "fail"
    r = judge(ReferenceBackend(), problem, "M=8 determinism", 8, kind="deterministic")
    assert r["status"] == "pass" and r["detail"] == "3 runs bitwise equal"


# --- worker processes ----------------------------------------------------------------------------
def test_crashes_and_hangs_are_reported_and_checking_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    report_path = tmp_path / "r.json"
    rc = check.main(["--preset", "gpt-oss-20b", "--quick", "--tokens", "1,5,7,9", "--timeout", "5",
                     "--backend", "test_check:CRASHER,test_check:HANGER,test_check:NOPE,no_such_module:X",
                     "--json", str(report_path)])
    assert rc == 1
    report = json.loads(report_path.read_text())
    status = {(r["backend"], r["case"]): r["status"] for r in report["results"]}
    cases = ["M=1", "M=5", "M=7", "M=9", "M=1 ids=-1", "M=5 ids=-1", "M=7 ids=-1", "M=9 ids=-1", "M=7 +shared",
             "M=7 NaN input", "M=7 NaN weight block", "M=7 determinism"]
    assert [status["test_check:CRASHER", c] for c in cases] == \
        ["pass", "crash", "pass", "pass", "pass", "pass", "pass", "crash", "pass", "pass", "pass", "pass"]
    assert [status["test_check:HANGER", c] for c in cases] == \
        ["pass", "pass", "pass", "pass", "timeout", "pass", "pass", "pass", "pass", "pass", "pass", "pass"]
    details = {(r["backend"], r["case"]): r["detail"] for r in report["results"]}
    assert details["test_check:CRASHER", "M=5"].startswith("worker killed by SIGABRT")
    assert details["test_check:CRASHER", "M=9 ids=-1"].startswith("worker killed by SIGSEGV")
    assert details["test_check:HANGER", "M=1 ids=-1"] == "timed out after 5 s"
    assert report["backends"]["test_check:CRASHER"] == {"usable": True, "reason": "", "restarts": 2}
    assert report["backends"]["test_check:HANGER"]["restarts"] == 1
    # a missing attribute is found by the worker, a missing module without one: both skipped, not failed
    assert report["backends"]["test_check:NOPE"]["reason"].startswith("AttributeError")
    assert report["backends"]["no_such_module:X"]["reason"] == \
        "not available in this build (no_such_module is missing)"
    assert {status["test_check:NOPE", c] for c in cases} == {"skip"}
    summary = dict(report["summary"])
    # the reference's batch invariance on a CPU depends on the BLAS ("no" is a property, not a failure)
    assert summary.pop("pass") + summary.pop("no", 0) == 23
    assert summary == {"crash": 2, "timeout": 1, "skip": 26}
    assert report["env"]["gpu"] == "cpu" and report["quick"] is True
    out = capsys.readouterr().out
    assert "CRASH test_check:CRASHER gpt-oss-20b-quick/mxfp4 M=5: worker killed by SIGABRT" in out
    assert "3 case(s) failed" in out


# --- comparing reports ---------------------------------------------------------------------------
def fake_report(rows, torch_version):
    return {"qmoe_check": 2, "env": {"gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
                    "versions": {"torch": torch_version, "triton": "3.6.0"}},
            "results": [{"backend": b, "problem": "gpt-oss-120b/mxfp4", "case": c, "status": s, "us": us,
                         "detail": d} for b, c, s, us, d in rows]}


def test_compare_finds_what_broke_and_what_got_slower(tmp_path, capsys):
    before = fake_report([("triton", "M=1", "pass", 60.0, ""), ("triton", "M=64", "pass", 600.0, ""),
                          ("triton", "M=1024", "pass", 1200.0, ""), ("flashinfer_cutlass", "M=1", "fail", 80.0, "x"),
                          ("flashinfer_cutlass", "M=7", "pass", None, "")], "2.10.0")
    # the upgrade: triton M=64 55% slower, M=1024 5% slower (noise), M=1 faster; one case broke, one fixed
    after = fake_report([("triton", "M=1", "pass", 40.0, ""), ("triton", "M=64", "pass", 930.0, ""),
                         ("triton", "M=1024", "pass", 1260.0, ""), ("flashinfer_cutlass", "M=1", "pass", 81.0, ""),
                         ("flashinfer_cutlass", "M=7", "crash", None, "worker killed by SIGSEGV"),
                         ("triton", "M=4096", "pass", 2300.0, "")], "2.11.0")
    d = check.compare_reports(before, after, threshold=0.10)
    assert d["env"] == [("torch", "2.10.0", "2.11.0")]
    assert d["broke"] == [("flashinfer_cutlass", "gpt-oss-120b/mxfp4", "M=7", "pass", "crash",
                           "worker killed by SIGSEGV")]
    assert [r[2] for r in d["fixed"]] == ["M=1"]
    assert d["slower"] == [("triton", "gpt-oss-120b/mxfp4", "M=64", 600.0, 930.0)]
    assert d["faster"] == [("triton", "gpt-oss-120b/mxfp4", "M=1", 60.0, 40.0)]
    assert d["only_after"] == [("triton", "gpt-oss-120b/mxfp4", "M=4096")] and d["only_before"] == []
    assert [r[2] for r in check.compare_reports(before, after, threshold=0.6)["slower"]] == []
    assert {r[2] for r in check.compare_reports(before, after, threshold=0.04)["slower"]} == {"M=64", "M=1024"}

    b, a = tmp_path / "b.json", tmp_path / "a.json"
    b.write_text(json.dumps(before))
    a.write_text(json.dumps(after))
    assert check.main(["--compare", str(b), str(a)]) == 1
    out = capsys.readouterr().out
    assert "torch: 2.10.0 -> 2.11.0" in out
    assert "BROKE: flashinfer_cutlass gpt-oss-120b/mxfp4 M=7: pass -> crash (worker killed by SIGSEGV)" in out
    assert "SLOWER by more than 10%: triton gpt-oss-120b/mxfp4 M=64: 600.0 -> 930.0 us (+55%)" in out
    assert "1 broke, 1 fixed, 1 slower, 1 faster" in out
    assert check.main(["--compare", str(b), str(b)]) == 0  # nothing changed
    capsys.readouterr()
    assert check.main(["--compare", str(b), str(tmp_path / "missing.json")]) == 2
    assert "--compare: cannot read a qmoe check report from" in capsys.readouterr().err


@pytest.mark.parametrize("content, why", [
    ('{"schema": 2, "kind": "qmoe-tuning", "entries": {}}', "it has no 'qmoe_check' field"),
    ("[1, 2]", "it holds a JSON list, not an object"),
    ('{"qmoe_check": 2, "results": {"a": 1}}', "its 'results' is not a list"),
    ('{"qmoe_check": 2, "results": [{"backend": "triton"}]}', "result 0 lacks backend / problem / case / status"),
])
def test_compare_names_the_file_that_is_not_a_report(tmp_path, capsys, content, why):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(fake_report([("triton", "M=1", "pass", 1.0, "")], "2.11.0")))
    bad.write_text(content)
    assert check.main(["--compare", str(good), str(bad)]) == 2
    assert f"--compare: {bad} is not a qmoe check report: {why}" in capsys.readouterr().err
