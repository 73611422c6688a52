"""qmoe.tuning: the tuning table's location, round trip, stale entries, merges, atomic concurrent writes."""

import json
import multiprocessing
import sys

import pytest

import qmoe
from qmoe import tuning

SPEC = qmoe.MoESpec(8, 2, 64, 96, name="t")


def entry_for(spec=SPEC, fmt="mxfp4", versions=None, times=None):
    env = tuning.environment("cpu")
    if versions is not None:
        env = dict(env, versions={**env["versions"], **versions})
    return tuning.make_entry(env, fmt, spec, times or {"reference": {1: 10.0, 64: 200.0}},
                             methods={"reference": "wall"}, layout_bytes={"reference": 0},
                             excluded={"triton": "needs a CUDA GPU"})


def test_default_path_env_var_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert tuning.default_path() == tmp_path / "cache" / "qmoe" / "tuning.json"
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "mine.json"))
    assert tuning.default_path() == tmp_path / "mine.json"


def test_round_trip_and_lookup(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    key, entry = entry_for()
    assert tuning.write_entries({key: entry}, path) == path
    table = tuning.read_table(path)
    assert table["schema"] == 2 and table["kind"] == "qmoe-tuning"
    assert table["entries"][key]["times_us"] == {"reference": {"1": 10.0, "64": 200.0}}
    assert table["entries"][key]["shape"] == {"num_experts": 8, "hidden_size": 64, "intermediate_size": 96,
                                              "top_k": 2}
    found = tuning.lookup(SPEC, "mxfp4", "cpu", path)
    assert found is not None and found[0] == key
    assert tuning.lookup(SPEC, "int4", "cpu", path) is None  # another format
    other = qmoe.MoESpec(8, 2, 64, 128)
    assert tuning.lookup(other, "mxfp4", "cpu", table) is None  # another shape
    assert tuning.read_table(tmp_path / "missing.json") == {"schema": 2, "kind": "qmoe-tuning", "entries": {}}


def test_entry_from_other_versions_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "tuning.json"
    key, entry = entry_for(versions={"torch": "0.0.1"})
    tuning.write_entries({key: entry}, path)
    with pytest.warns(UserWarning, match=r"ignoring the entry .* torch 0\.0\.1 \(now "):
        assert tuning.lookup(SPEC, "mxfp4", "cpu", path) is None
    # once this installation has its own entry, that one is used (and the stale one stays for its owner)
    key2, entry2 = entry_for(times={"reference": {1: 3.0}})
    tuning.write_entries({key2: entry2}, path)
    assert tuning.lookup(SPEC, "mxfp4", "cpu", path)[1]["times_us"] == {"reference": {"1": 3.0}}
    assert set(tuning.read_table(path)["entries"]) == {key, key2}


def test_broken_or_foreign_files_are_ignored_with_a_warning_and_replaced(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text('{"schema": 1, "entr')
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert tuning.read_table(path)["entries"] == {}
    path.write_text(json.dumps({"schema": 99, "kind": "qmoe-tuning", "entries": {}}))
    with pytest.warns(UserWarning, match="schema 99"):
        assert tuning.read_table(path)["entries"] == {}
    key, entry = entry_for()
    tuning.write_entries({key: entry}, path)
    assert list(tuning.read_table(path)["entries"]) == [key]


def test_merge_keeps_what_a_partial_run_did_not_measure():
    _, old = entry_for(times={"triton": {1: 50.0, 64: 600.0}, "marlin": {1: 40.0, 64: 700.0}})
    old["errors"] = {"triton": {"8192": "OutOfMemoryError"}}
    _, new = entry_for(times={"triton": {64: 550.0, 8192: 7000.0}})
    new["excluded"] = {"humming": "not installed"}
    merged = tuning.merge_entry(old, new)
    assert merged["times_us"] == {"triton": {"1": 50.0, "64": 550.0, "8192": 7000.0},
                                  "marlin": {"1": 40.0, "64": 700.0}}
    assert merged["errors"] == {}  # 8192 was measured this time
    assert merged["excluded"] == {"humming": "not installed"}  # triton, measured now, left `excluded`
    _, gone = entry_for(times={})
    gone["excluded"] = {"marlin": "vLLM's op library is missing"}
    after = tuning.merge_entry(merged, gone)
    assert "marlin" not in after["times_us"] and after["excluded"]["marlin"] == "vLLM's op library is missing"


def _writer(path, worker, count):
    for i in range(count):
        key, entry = entry_for(times={"reference": {1: float(worker * 1000 + i + 1)}})
        tuning.write_entries({f"w{worker}-{i}": entry}, path)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_concurrent_writers_lose_nothing_and_readers_never_see_half_a_file(tmp_path):
    path = tmp_path / "tuning.json"
    ctx = multiprocessing.get_context("fork")  # children only touch files: fork is safe and fast
    writers = [ctx.Process(target=_writer, args=(path, w, 15)) for w in range(4)]
    for p in writers:
        p.start()
    reads = 0
    while any(p.is_alive() for p in writers):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        json.loads(text)  # raises if a reader ever saw a partial file
        reads += 1
    for p in writers:
        p.join()
        assert p.exitcode == 0
    entries = tuning.read_table(path)["entries"]
    assert set(entries) == {f"w{w}-{i}" for w in range(4) for i in range(15)}
    assert entries["w3-14"]["times_us"]["reference"]["1"] == 3015.0
    assert reads > 0
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["tuning.json", "tuning.json.lock"]  # no temporary files left behind
