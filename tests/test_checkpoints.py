"""The checkpoint mechanism (tasks/checkpoints.py) as the flow's node
checkpoints use it (flows/checkpoint.py): publish after verification, verify
again on reuse, discard what fails. No Ray: datasets are written with Lance."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import lance
import numpy as np
import pyarrow as pa

from flows.checkpoint import CheckpointStore

SPEC = SimpleNamespace(type_name="Filter", path="pipeline/Filter")
KEY = "0123456789abcdef0123"


def _dataset(uri: str, rows: int = 9, mode: str = "create") -> int:
    table = pa.table({"x": np.arange(rows)})
    return lance.write_dataset(table, uri, mode=mode, max_rows_per_file=max(1, rows // 3)).version


def test_a_data_checkpoint_is_reused_until_a_file_is_lost(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    assert store.lookup(SPEC, KEY) is None
    uri = store.data_uri(SPEC, KEY)
    assert uri != store.data_uri(SPEC, KEY)  # one dataset per run
    version = _dataset(uri)
    store.save(SPEC, KEY, uri, version, 9, "data", 1.0)
    marker = store.lookup(SPEC, KEY)
    assert (marker["uri"], marker["version"], marker["rows"], marker["kind"]) == (uri, version, 9, "data")
    assert marker["node"] == SPEC.path and marker["key"] == KEY
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    lost = sorted((tmp_path / "ckpt").glob("Filter-*.lance/data/*"))[0]
    lost.unlink()
    with caplog.at_level(logging.WARNING):
        assert store.lookup(SPEC, KEY) is None
    assert "discarded" in caplog.text and lost.name in caplog.text
    assert not list((tmp_path / "ckpt").glob("Filter-*.lance"))  # provably broken, owned: deleted


def test_a_writer_checkpoint_is_not_reused_once_its_output_changed(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    out = str(tmp_path / "out.lance")
    version = _dataset(out)
    store.save(SPEC, KEY, out, version, 9, "writer", 1.0, storage_options={})
    assert store.lookup(SPEC, KEY, {})["uri"] == out
    _dataset(out, rows=3, mode="append")
    with caplog.at_level(logging.WARNING):
        assert store.lookup(SPEC, KEY, {}) is None
    assert f"recorded version {version}" in caplog.text
    assert lance.dataset(out).count_rows() == 12  # never deleted: it is the user's output


def test_an_incomplete_dataset_is_not_published(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    uri = store.data_uri(SPEC, KEY)
    version = _dataset(uri)
    with caplog.at_level(logging.WARNING):
        store.save(SPEC, KEY, uri, version, 10, "data", 1.0)  # it holds 9 rows
    assert "not saved" in caplog.text and "9 rows, expected 10" in caplog.text
    assert not list((tmp_path / "ckpt").glob("*.json"))


def test_markers_written_before_the_shared_mechanism_are_read(tmp_path):
    root = tmp_path / "ckpt"
    uri = str(root / f"Filter-{KEY}.lance")  # the fixed name the store used to write
    version = _dataset(uri)
    old = {"node": SPEC.path, "type": "Filter", "key": KEY, "uri": uri, "version": version, "rows": 9,
           "kind": "data", "seconds": 0.5, "created": "2026-01-01T00:00:00Z"}
    (root / f"Filter-{KEY}.json").write_text(json.dumps(old, indent=1))
    assert CheckpointStore(str(root)).lookup(SPEC, KEY) == old
