"""Bad input data: one clear message naming the reader node (its path in the
tree) and the offending file, no traceback, nothing written. Problems that
metadata shows (Lance manifests, Parquet footers, file sizes) are found by the
readers' check() before start-up (exit 2); problems inside a file's contents
when the run reads it (exit 1)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.base import NodeError, RunContext
from tests.test_config_errors import run_cli

BAD_UTF8_LINES = b'{"id": 1, "text": "fine"}\n{"id": 2, "text": "caf\xe9 \xff"}\n'


def assert_reported(proc, code: int, *needles: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-4000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def assert_nothing_written(path) -> None:
    """No dataset was committed: nothing to read at ``path``. (Fragments a
    failed write had already written are not part of any version.)"""
    from tasks.storage import lance_exists

    assert not (path / "_versions").exists() and not lance_exists(str(path), {})


def _damaged_inputs(root) -> list[tuple[str, str, str]]:
    """(reader YAML, file the message must name) for each input whose
    problem its metadata shows."""
    import lance

    (root / "mixed").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), root / "mixed" / "part-0.parquet")
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["c", "d"]}), root / "mixed" / "part-1.parquet")
    (root / "mixed" / "_SUCCESS").write_text("")  # hidden, as Spark writes it: not read

    ds = lance.write_dataset(pa.table({"id": list(range(20))}), str(root / "holed.lance"), max_rows_per_file=10)
    lost = ds.get_fragments()[1].data_files()[0].path
    (root / "holed.lance" / "data" / lost).unlink()

    pq.write_table(pa.table({"id": list(range(100))}), root / "cut.parquet")
    whole = (root / "cut.parquet").read_bytes()
    (root / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (root / "notes.parquet").write_text("these are notes, not Parquet\n")
    (root / "empty.jsonl").write_bytes(b"")
    return [
        (f"{{type: LanceReader, input_path: {root}/mixed}}", "LanceReader", "part-1.parquet"),
        (f"{{type: LanceReader, input_path: '{root}/mixed/part-*.parquet'}}", "LanceReader", "part-1.parquet"),
        (f"{{type: LanceReader, input_path: {root}/holed.lance}}", "LanceReader", lost),
        (f"{{type: FormatReader, data_format: parquet, input_path: {root}/cut.parquet}}", "FormatReader", "cut.parquet"),
        (f"{{type: LanceReader, input_path: {root}/notes.parquet}}", "LanceReader", "notes.parquet"),
        (f"{{type: JsonReader, input_path: {root}/empty.jsonl}}", "JsonReader", "empty.jsonl"),
    ]


def test_damaged_inputs_are_reported_before_start_up(tmp_path):
    """Every reader is checked (one message lists them all), before Ray or
    Prefect start: no full run is paid for inputs whose metadata is bad."""
    readers = _damaged_inputs(tmp_path)
    children = "\n".join(f"                - {yaml}" for yaml, _, _ in readers)
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceWriter
          output_path: {tmp_path}/out.lance
          child_configs:
            - type: UnionByName
              allow_missing_columns: true
              child_configs:
{children}
        """)
    needles = [f"pipeline > child_configs[0] > child_configs[{i}] > {kind}" for i, (_, kind, _) in enumerate(readers)]
    assert_reported(proc, 2, *needles, *(name for _, _, name in readers))
    assert "column 'id' is int64 in" in proc.stderr and "but string in" in proc.stderr
    assert "data file(s) missing" in proc.stderr and "Parquet magic bytes not found" in proc.stderr
    for line in proc.stderr.splitlines():  # each problem is one line naming its node
        if "part-1.parquet" in line or "empty.jsonl" in line:
            assert "pipeline > child_configs[0] > child_configs[" in line, line
    assert not (tmp_path / "out.lance").exists()
    assert "Started a local Ray" not in proc.stderr


def test_invalid_utf8_fails_the_run_naming_reader_and_file(tmp_path, ray_session):
    """Contents are only seen by the read itself (inside a Ray read task): the
    run fails with the reader's path and the file, exit 1. The run joins this
    session's Ray and Prefect API (a fresh start-up is not the subject)."""
    from prefect.settings import get_current_settings

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.jsonl").write_text('{"id": 0, "text": "ok"}\n')
    (tmp_path / "in" / "latin1.jsonl").write_bytes(BAD_UTF8_LINES)
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceWriter
          output_path: {tmp_path}/out.lance
          child_configs:
            - type: LanceReader
              input_format: jsonl
              input_path: '{tmp_path}/in/*.jsonl'
        """, "--ray-address", ray_session.get_runtime_context().gcs_address,
                   env={"PREFECT_API_URL": get_current_settings().api.url, "PREFECT_HOME": str(tmp_path / "prefect-home"),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert_reported(proc, 1, "error: node failed: pipeline > child_configs[0] > LanceReader: cannot read",
                    "latin1.jsonl", "not valid UTF-8")
    assert_nothing_written(tmp_path / "out.lance")


# --- the same failures in each reader, in this session's Ray (no CLI start-up)


def _read_all(node):
    node.check(RunContext())
    stream = node.apply([], RunContext())
    return pa.concat_tables(list(stream.ds.iter_batches(batch_format="pyarrow", batch_size=None)))


def _bad_utf8_zst(path):
    with pa.CompressedOutputStream(str(path), "zstd") as out:
        out.write(BAD_UTF8_LINES)


def _bad_csv_row(path):
    # The bad row lies past the first block (1 MiB) that the schema is read
    # from, so the read itself finds it.
    good = "".join(f"{i},text {i}\n" for i in range(70_000))
    path.write_text("id,text\n" + good + "1,2,3\n")


@pytest.mark.parametrize(
    "reader, params, name, write, needle",
    [
        ("JsonReader", {}, "bad.jsonl", lambda p: p.write_bytes(BAD_UTF8_LINES), "not valid UTF-8"),
        ("FormatReader", {"data_format": "jsonl"}, "bad.jsonl", lambda p: p.write_bytes(BAD_UTF8_LINES), "not valid UTF-8"),
        ("JsonlZstReader", {}, "bad.jsonl.zst", _bad_utf8_zst, "not valid UTF-8"),
        ("FormatReader", {"data_format": "csv"}, "bad.csv", _bad_csv_row, "Expected 2 columns, got 3"),
    ],
    ids=["json", "format-jsonl", "jsonl-zst", "csv-row"],
)
def test_each_reader_names_the_file_it_could_not_read(ray_session, tmp_path, reader, params, name, write, needle):
    from tasks.base import NODE_TYPES

    write(tmp_path / name)
    cls = NODE_TYPES[reader]
    node = cls(cls.Params(input_path=str(tmp_path / name), **params), f"pipeline > {reader}")
    with pytest.raises(NodeError) as info:
        _read_all(node)
    assert info.value.node_path == f"pipeline > {reader}"
    problem = info.value.problem
    assert problem.startswith("cannot read ") and name in problem and needle in problem, problem


def test_parquet_directory_of_compatible_files_and_empty_json_among_others(ray_session, tmp_path):
    """A directory's files are read by their own footers (unioned by name);
    an empty JSON-lines file next to others adds no rows."""
    from tasks.readers import JsonReader, LanceReader

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "text": ["a", "b"]}), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.table({"id": pa.array([3], pa.int64())}), tmp_path / "pq" / "part-1.parquet")
    table = _read_all(LanceReader(LanceReader.Params(input_path=str(tmp_path / "pq")), "pipeline > LanceReader"))
    assert sorted(table["id"].to_pylist()) == [1, 2, 3] and table["text"].null_count == 1

    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("\n".join(json.dumps({"id": i}) for i in range(3)) + "\n")
    (tmp_path / "j" / "b.jsonl").write_bytes(b"")
    table = _read_all(JsonReader(JsonReader.Params(input_path=str(tmp_path / "j" / "*.jsonl")), "pipeline > JsonReader"))
    assert table["id"].to_pylist() == [0, 1, 2]


def test_empty_inputs_under_a_schema_read_as_an_empty_table(ray_session, tmp_path):
    from tasks.readers import JsonReader

    (tmp_path / "e.jsonl").write_bytes(b"")
    node = JsonReader(JsonReader.Params(input_path=str(tmp_path / "e.jsonl"), schema="id BIGINT, text STRING"),
                      "pipeline > JsonReader")
    node.check(RunContext())
    stream = node.apply([], RunContext())
    assert stream.schema.names == ["id", "text"]
    assert stream.ds.count() == 0
