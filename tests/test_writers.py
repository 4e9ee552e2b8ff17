"""LanceWriter modes on real Lance datasets (SPEC §3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import lance
import pyarrow as pa
import pytest

from tasks.base import NodeError, RunContext, Stream
from tasks.writers import LanceWriter, LanceWriterZstd
from tests.conftest import ROOT, read_lance


def stream_of(ray, table: pa.Table, blocks: int = 2) -> Stream:
    return Stream(ray.data.from_arrow(table).repartition(blocks), table.schema)


def write(ray, table, path, blocks=2, cls=LanceWriter, **params):
    node = cls(cls.Params(output_path=str(path), **params), "pipeline > LanceWriter")
    node.check(RunContext())
    out = node.apply([stream_of(ray, table, blocks)], RunContext())
    return out


T1 = pa.table({"id": pa.array(range(10), pa.int64()), "text": [f"row {i}" for i in range(10)]})
T2 = pa.table({"id": pa.array(range(100, 105), pa.int64()), "text": [f"new {i}" for i in range(5)]})


def test_overwrite_replaces_and_append_adds(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    write(ray_session, T1, path)
    assert read_lance(path).num_rows == 10
    out = write(ray_session, T2, path, mode="overwrite")
    assert out.num_rows == 5 and sorted(read_lance(path)["id"].to_pylist()) == list(range(100, 105))
    write(ray_session, T1, path, mode="append")
    assert read_lance(path).num_rows == 15


def test_overwrite_with_a_different_schema_replaces(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    write(ray_session, T1, path)
    other = pa.table({"doc": ["a", "b", "c"], "score": [0.1, 0.2, 0.3]})
    write(ray_session, other, path, mode="overwrite")
    table = read_lance(path)
    assert table.schema.names == ["doc", "score"] and sorted(table["doc"].to_pylist()) == ["a", "b", "c"]


def test_append_schema_mismatch_is_an_error(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    write(ray_session, T1, path)
    other = pa.table({"id": pa.array([1], pa.int64()), "score": [0.5]})
    with pytest.raises(NodeError, match="schema differs"):
        write(ray_session, other, path, mode="append")
    assert read_lance(path).equals(read_lance(path))
    assert read_lance(path).num_rows == 10


def test_create_never_overwrites(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    write(ray_session, T1, path, mode="create")
    before = lance.dataset(str(path)).version
    with pytest.raises(NodeError, match="already exists"):
        write(ray_session, T2, path, mode="create")
    assert lance.dataset(str(path)).version == before
    assert sorted(read_lance(path)["id"].to_pylist()) == list(range(10))


def test_ignore_and_read_if_exists_return_existing(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    write(ray_session, T1, path)
    for mode in ("ignore", "read_if_exists"):
        node = LanceWriter(LanceWriter.Params(output_path=str(path), mode=mode), "pipeline > LanceWriter")
        existing = node.short_circuit(RunContext())
        assert existing is not None and existing.num_rows == 10
    fresh = tmp_path / "fresh.lance"
    node = LanceWriter(LanceWriter.Params(output_path=str(fresh), mode="ignore"), "pipeline > LanceWriter")
    assert node.short_circuit(RunContext()) is None
    write(ray_session, T1, fresh, mode="ignore")
    assert read_lance(fresh).num_rows == 10


def test_empty_result_commits_empty_dataset_with_schema(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    write(ray_session, T1, path)
    empty = T1.slice(0, 0)
    out = write(ray_session, empty, path, blocks=1, mode="overwrite")
    ds = lance.dataset(str(path))
    assert out.num_rows == 0 and ds.count_rows() == 0
    assert ds.schema.names == ["id", "text"]
    fresh = tmp_path / "new.lance"
    write(ray_session, empty, fresh, blocks=1)
    assert lance.dataset(str(fresh)).schema.names == ["id", "text"]


def test_num_output_files_and_select_cols(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    big = pa.table({"id": pa.array(range(1000), pa.int64()), "text": [str(i) for i in range(1000)], "x": [1.0] * 1000})
    write(ray_session, big, path, blocks=7, num_output_files=3, select_cols=["text", "id"])
    ds = lance.dataset(str(path))
    assert len(ds.get_fragments()) == 3
    assert ds.schema.names == ["text", "id"]


def test_seeded_shuffle_is_reproducible(ray_session, tmp_path):
    big = pa.table({"id": pa.array(range(500), pa.int64())})
    write(ray_session, big, tmp_path / "a.lance", shuffle=True, seed=3)
    write(ray_session, big, tmp_path / "b.lance", shuffle=True, seed=3)
    a, b = read_lance(tmp_path / "a.lance")["id"].to_pylist(), read_lance(tmp_path / "b.lance")["id"].to_pylist()
    assert a == b and a != list(range(500)) and sorted(a) == list(range(500))


def test_zstd_writer_coalesces_and_compresses(ray_session, tmp_path):
    path = tmp_path / "z.lance"
    big = pa.table({"id": pa.array(range(2000), pa.int64()), "text": ["lorem ipsum " * 20] * 2000})
    write(ray_session, big, path, blocks=8, cls=LanceWriterZstd, use_coalesce=True, num_output_files=2, compression_level=9)
    ds = lance.dataset(str(path))
    assert len(ds.get_fragments()) == 2 and ds.count_rows() == 2000
    assert read_lance(path)["text"].to_pylist() == big["text"].to_pylist()



@pytest.mark.parametrize("coalesce", [True, False])
def test_zstd_writer_merges_blocks_by_merge_count(ray_session, tmp_path, coalesce):
    """SPEC §3: without num_output_files, max(1, blocks / merge_count) files
    (the detokenization recipes' shape: use_coalesce and merge_count only)."""
    big = pa.table({"id": pa.array(range(900), pa.int64()), "text": ["lorem ipsum"] * 900})
    for blocks, merge_count, files in ((9, 3, 3), (8, 3, 2), (2, 5, 1)):
        path = tmp_path / f"m{blocks}-{merge_count}.lance"
        write(ray_session, big, path, blocks=blocks, cls=LanceWriterZstd, use_coalesce=coalesce, merge_count=merge_count)
        ds = lance.dataset(str(path))
        assert (len(ds.get_fragments()), ds.count_rows()) == (files, 900)
        assert sorted(read_lance(path)["id"].to_pylist()) == list(range(900))


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    import pyarrow as pa, ray
    from tasks.base import RunContext, Stream
    from tasks.writers import LanceWriter
    ray.init(address={address!r})  # this test session's Ray: the write's driver is what gets killed
    def slow(batch):
        time.sleep(0.4)
        return batch
    table = pa.table({{"id": pa.array(range(40000), pa.int64()), "text": ["x" * 100] * 40000}})
    ds = ray.data.from_arrow(table).repartition(40).map_batches(slow, batch_format="pyarrow", batch_size=None)
    node = LanceWriter(LanceWriter.Params(output_path={path!r}, num_output_files=40), "pipeline > LanceWriter")
    node.apply([Stream(ds, table.schema)], RunContext())
    print("FINISHED")
    """
)


def test_killed_write_leaves_previous_version_readable(ray_session, tmp_path):
    path = tmp_path / "t.lance"
    write(ray_session, T1, path)
    version = lance.dataset(str(path)).version
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), path=str(path), address=ray_session.get_runtime_context().gcs_address))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    data_dir = path / "data"
    before = set(os.listdir(data_dir))
    deadline = time.time() + 180
    try:
        while time.time() < deadline and set(os.listdir(data_dir)) == before:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        assert set(os.listdir(data_dir)) != before, "the writer never started writing"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray processes
        proc.wait()
    ds = lance.dataset(str(path))
    assert ds.version == version
    assert sorted(ds.to_table()["id"].to_pylist()) == list(range(10))


def test_unwritable_output_is_a_node_error(ray_session):
    with pytest.raises(NodeError, match=r"LanceWriter: cannot write '/proc/kaiyuan-test.lance': .*LanceError\(IO\)"):
        write(ray_session, T1, "/proc/kaiyuan-test.lance")
