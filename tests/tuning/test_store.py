"""qmoe.tuning.store: every way a table file can be damaged is ignored with a warning naming the
file (or the entry); writes replace a damaged file; unwritable paths fail before any work."""

import json
import os
import warnings

import pytest

import qmoe
from qmoe import tuning
from qmoe.backends.triton import configs
from qmoe.tuning.store import TableStore

SPEC = qmoe.MoESpec(8, 2, 64, 96, name="t")
STORE = TableStore("qmoe-test", "test.json", "QMOE_TEST_TABLE",
                   lambda e: None if isinstance(e, dict) and isinstance(e.get("n"), int) else "'n' is not an int")


def damage(path, how):
    if how == "folder":
        path.mkdir()
    elif how == "not utf-8":
        path.write_bytes(b'{"schema": 2, "kind": "qmoe-test", "entries": {"\xff": 1}}')
    elif how == "not json":
        path.write_text('{"schema": 2, "ki')
    elif how == "a list":
        path.write_text("[]")
    elif how == "other kind":
        path.write_text(json.dumps({"schema": 2, "kind": "qmoe-tuning", "entries": {}}))
    elif how == "old schema":
        path.write_text(json.dumps({"schema": 1, "kind": "qmoe-test", "entries": {}}))
    elif how == "entries a list":
        path.write_text(json.dumps({"schema": 2, "kind": "qmoe-test", "entries": []}))
    elif how == "unreadable":
        path.write_text(json.dumps({"schema": 2, "kind": "qmoe-test", "entries": {}}))
        path.chmod(0)


DAMAGES = ["folder", "not utf-8", "not json", "a list", "other kind", "old schema", "entries a list", "unreadable"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_file_is_ignored_with_a_warning_naming_it(tmp_path, how):
    if how == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files of mode 0")
    path = tmp_path / "t.json"
    damage(path, how)
    with pytest.warns(UserWarning, match=f"ignoring qmoe-test table {path}"):
        assert STORE.read(path)["entries"] == {}


@pytest.mark.parametrize("how", [d for d in DAMAGES if d not in ("folder", "unreadable")])
def test_update_replaces_a_damaged_file(tmp_path, how):
    path = tmp_path / "t.json"
    damage(path, how)
    with pytest.warns(UserWarning, match="replacing damaged qmoe-test table"):
        STORE.update(lambda entries: entries.update(a={"n": 1}), path)
    assert STORE.read(path)["entries"] == {"a": {"n": 1}}


def test_a_damaged_entry_is_skipped_with_a_warning_naming_it(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema": 2, "kind": "qmoe-test",
                                "entries": {"good": {"n": 1}, "bad": {"n": "one"}, "worse": [1]}}))
    with pytest.warns(UserWarning) as seen:
        assert STORE.read(path)["entries"] == {"good": {"n": 1}}
    text = " | ".join(str(w.message) for w in seen)
    assert "entry 'bad'" in text and "entry 'worse'" in text and str(path) in text


def test_unwritable_paths_fail_up_front(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        STORE.check_writable(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="cannot create folder"):
        STORE.check_writable(tmp_path / "f" / "sub" / "t.json")
    assert STORE.check_writable(tmp_path / "new" / "t.json") == tmp_path / "new" / "t.json"


@pytest.mark.parametrize("content", [
    b"\xff\xfe",  # not UTF-8
    b'{"schema": 2, "kind": "qmoe-tuning", "entries": {"k": {"times_us": {"triton": {"1": "fast"}}, '
    b'"versions": {}}}}',  # a field of the wrong type
    b'{"schema": 2, "kind": "qmoe-tuning", "entries": {"k": {"times_us": [], "versions": {}}}}',
])
def test_moe_auto_survives_a_damaged_tuning_table(tmp_path, monkeypatch, content):
    path = tmp_path / "tuning.json"
    path.write_bytes(content)
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    from conftest import random_weights, small_spec

    spec = small_spec()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        moe = qmoe.MoE(spec, random_weights(spec))
    assert moe.backend_for(1) in ("triton", "reference")
    assert any(str(path) in str(w.message) for w in seen)


def test_a_directory_at_the_tuning_path_does_not_break_auto(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path))
    from conftest import random_weights, small_spec

    spec = small_spec()
    with pytest.warns(UserWarning, match="it is a folder"):
        qmoe.MoE(spec, random_weights(spec))


@pytest.mark.parametrize("entry, why", [
    ({"buckets": {"1": {"block_m": 16, "block_n2": 256}}}, "block_n2=256 does not divide the padded hidden size 128"),
    ({"buckets": {"1": {"block_n1": 256}}}, "block_n1=256 does not divide the padded intermediate size 128"),
    ({"buckets": {"1": {"block_m": "16"}}}, "config field 'block_m' must be int"),
    ({"buckets": {"1": {"colour": 1}}}, "unknown config fields"),
    ({"buckets": {"x": {}}}, "bucket 'x' is not a positive token count"),
    ({"buckets": []}, "'buckets' is not a JSON object"),
])
def test_triton_configs_are_checked_against_the_padded_shape_where_loaded(tmp_path, entry, why):
    """A user table whose config would launch too few tiles (output read from uninitialized
    memory: relative error 1.0 with no NaN) is refused with the file and the entry named."""
    spec = qmoe.MoESpec(4, 2, 64, 96)
    key = "cpu|mxfp4|E4 H64 I96 k2|" + " ".join(f"{k} {v or '-'}" for k, v in sorted(configs.versions().items()))
    full = {"gpu": "cpu", "format": "mxfp4", "versions": configs.versions(),
            "shape": {"num_experts": 4, "hidden_size": 64, "intermediate_size": 96, "top_k": 2}, **entry}
    path = tmp_path / "triton_configs.json"
    path.write_text(json.dumps({"schema": 2, "kind": "qmoe-triton-configs", "entries": {key: full}}))
    with pytest.warns(UserWarning, match=f"ignoring entry .* of qmoe-triton-configs table {path}: .*{why}"):
        found, _ = configs.load_configs("cpu", "mxfp4", spec, path, shipped_path=tmp_path / "none.json")
    assert found == {}


def test_batch_invariant_entries_outside_the_family_are_ignored_with_a_note(tmp_path):
    """Batch-invariant entries of a user table written before the family changed (an mma.sync
    configuration, session 9's family; fp32 rows, the family's until session 17) are not run in
    batch-invariant mode, and the notes say so; its member of the family is kept."""
    from qmoe.kernels.moe import KernelConfig

    spec = qmoe.MoESpec(4, 2, 64, 96)
    old9, old16 = KernelConfig(16, 64, 64, False, y_bf16=True), KernelConfig(16, 64, 64, True)
    new = KernelConfig(16, 64, 64, True, y_bf16=True)
    path = configs.write_configs("cpu", "mxfp4", spec, {1: old9, 16: old16, 64: new}, tmp_path / "t.json",
                                 batch_invariant=True)
    found, notes = configs.load_configs("cpu", "mxfp4", spec, path, shipped_path=tmp_path / "none.json",
                                        batch_invariant=True)
    assert found == {64: new}
    assert any("buckets [1, 16] are outside the batch-invariant family" in n for n in notes), notes


def test_the_kernel_refuses_a_config_that_does_not_fit_where_it_is_passed():
    from conftest import random_weights, small_spec
    import torch
    from qmoe.backends import get_backend
    from qmoe.kernels.moe import KernelConfig

    spec = small_spec()
    b = get_backend("triton")
    p = b.prepare(spec, random_weights(spec))
    x = torch.randn(2, spec.hidden_size, dtype=torch.bfloat16)
    ids = torch.zeros(2, spec.top_k, dtype=torch.int32)
    ids[:, 1] = 1
    w = torch.full((2, spec.top_k), 0.5)
    with pytest.raises(ValueError, match="block_n2=256 does not divide the padded hidden size 128"):
        b.forward(p, x, ids, w, torch.empty_like(x), config=KernelConfig(block_n2=256))


def _config_writer(path, worker, count):
    from qmoe.kernels.moe import KernelConfig

    spec = qmoe.MoESpec(4, 2, 64, 96)
    for i in range(count):
        configs.write_configs("cpu", "mxfp4", spec, {worker * 100 + i + 1: KernelConfig()}, path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method")
def test_concurrent_config_writers_lose_nothing(tmp_path):
    """8 writers x 25 buckets into one triton config table: all 200 kept (issue: 62 of 200)."""
    import multiprocessing

    path = tmp_path / "triton_configs.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_config_writer, args=(path, w, 25)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    (entry,) = configs.USER_TABLE.read(path)["entries"].values()
    assert len(entry["buckets"]) == 200


def test_every_kernel_config_field_round_trips_through_json():
    from dataclasses import asdict

    from qmoe.kernels.moe import KernelConfig

    cfg = KernelConfig(32, 64, 128, False, 8, 4, 2, split_k=2, direct=True, pdl=True)
    assert configs.kernel_config(json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(TypeError, match="'direct' must be bool"):
        configs.kernel_config({"direct": 1})
