"""Readers (SPEC §3) and storage options (SPEC §4)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tasks.base import NodeError, RunContext
from tasks.readers import FormatReader, JsonlZstReader, LanceReader, NpyReader, detect_format
from tasks.schema import fit_to_hint, parse_spark_schema
from tasks.storage import StorageConfigError, env_storage_options, normalize_uri, resolve_storage_options
from tests.conftest import read_lance


def read(cls, **params):
    node = cls(cls.Params(**params), f"pipeline > {cls.type_name}")
    node.check(RunContext())
    stream = node.apply([], RunContext())
    # small test data only: gather through Ray's own iterator
    batches = list(stream.ds.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(batches) if batches else stream.schema.empty_table()
    return stream, table


def test_normalize_uri():
    assert normalize_uri("lance.`s3a://b/x.lance`") == "s3://b/x.lance"
    assert normalize_uri("lance.data/x.lance") == "data/x.lance"
    assert normalize_uri("s3a://bucket/a") == "s3://bucket/a"
    assert normalize_uri("/tmp/a.lance") == "/tmp/a.lance"


def test_detect_format(tmp_path):
    assert detect_format("x.lance") == "lance"
    assert detect_format("s3://b/parquets/part-0") == "parquet"
    assert detect_format("a_parquet") == "parquet"
    assert detect_format("d/part-0.jsonl.zst") == "json"


def test_env_storage_options_mapping():
    opts = env_storage_options({"MINIO_ENDPOINT": "minio:9000", "MINIO_ACCESS_KEY": "ak", "MINIO_SECRET_KEY": "sk", "AWS_REGION": "us-east-1"})
    assert opts == {"aws_endpoint": "http://minio:9000", "aws_access_key_id": "ak", "aws_secret_access_key": "sk", "aws_region": "us-east-1", "aws_allow_http": "true"}
    opts = env_storage_options({"AWS_ENDPOINT_URL": "s3.example.com", "LANCE_AWS_ALLOW_HTTP": "false"})
    assert opts["aws_endpoint"] == "https://s3.example.com" and opts["aws_allow_http"] == "false"
    assert env_storage_options({"LANCE_STORAGE_OPTIONS_JSON": '{"aws_region": "eu"}', "AWS_REGION": "x"}) == {"aws_region": "eu"}
    with pytest.raises(StorageConfigError, match="not valid JSON"):
        env_storage_options({"LANCE_STORAGE_OPTIONS_JSON": "{nope"})


def test_storage_options_first_match_wins_and_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    assert resolve_storage_options({"a": "node"}, {"a": "run"}) == {"a": "node"}
    assert resolve_storage_options(None, {"a": "run"}) == {"a": "run"}
    resolved = resolve_storage_options(None, None)
    assert resolved["aws_secret_access_key"] == "env-secret"
    assert "env-secret" not in repr(resolved) and "env-secret" not in str(resolved)


def test_multi_path_union_by_name_with_nested_select(ray_session, sample_dir):
    _, table = read(
        LanceReader,
        input_path=[f"lance.`{sample_dir}/pcmind_kaiyuan_2b_sample.lance`", str(sample_dir / "dclm_subset.lance")],
        select_cols=["id", "text", "metadata.url"],
    )
    assert table.column_names == ["id", "text", "url"]
    assert table.num_rows == 4000
    # the dclm rows have no metadata struct: filled with null
    assert table["url"].null_count == 2000


def test_union_by_name_fills_missing_columns(ray_session, sample_dir):
    stream, table = read(LanceReader, input_path=[str(sample_dir / "dclm_subset.lance"), str(sample_dir / "dclm_subset_dedup.lance")])
    assert "duplicate_count" in stream.schema.names
    assert table["duplicate_count"].null_count == 2000 and table.num_rows == 4000


def test_parquet_glob_json_zst_csv(ray_session, tmp_path):
    t = pa.table({"id": pa.array(range(6), pa.int64()), "text": [f"t{i}" for i in range(6)]})
    (tmp_path / "pq").mkdir()
    pq.write_table(t.slice(0, 3), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(t.slice(3, 3), tmp_path / "pq" / "part-1.parquet")
    _, table = read(LanceReader, input_path=str(tmp_path / "pq" / "part-*.parquet"))
    assert sorted(table["id"].to_pylist()) == list(range(6))

    lines = "\n".join(json.dumps({"id": i, "text": f"j{i}"}) for i in range(5)).encode()
    with pa.CompressedOutputStream(str(tmp_path / "a.jsonl.zst"), "zstd") as out:
        out.write(lines)
    _, table = read(JsonlZstReader, input_path=str(tmp_path / "*.jsonl.zst"))
    assert table["text"].to_pylist() == [f"j{i}" for i in range(5)]

    pacsv.write_csv(t, tmp_path / "t.csv")
    _, table = read(FormatReader, input_path=str(tmp_path / "t.csv"), data_format="csv")
    assert table.num_rows == 6


def test_npy_reader_one_row_per_file(ray_session, tmp_path):
    for i in range(3):
        np.save(tmp_path / f"a{i}.npy", np.arange(4, dtype=np.int32) + i)
    _, table = read(NpyReader, input_path=str(tmp_path / "*.npy"), column_name="tokens", path_column="path")
    rows = sorted(zip(table["path"].to_pylist(), table["tokens"].to_pylist()))
    assert [r[1] for r in rows] == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]


def test_npy_unreadable_file_is_reported(ray_session, tmp_path):
    np.save(tmp_path / "a0.npy", np.arange(4))
    (tmp_path / "a1.npy").write_bytes(b"not numpy")
    with pytest.raises(Exception, match="unreadable .npy file"):
        read(NpyReader, input_path=str(tmp_path / "*.npy"))


def test_missing_path_and_empty_glob_are_node_errors(tmp_path):
    for path in (str(tmp_path / "none.lance"), str(tmp_path / "*.parquet")):
        node = LanceReader(LanceReader.Params(input_path=path), "pipeline > LanceReader")
        with pytest.raises(NodeError, match="pipeline > LanceReader"):
            node.check(RunContext())


def test_lance_read_failure_is_not_hidden_by_parquet_fallback(ray_session, tmp_path):
    bad = tmp_path / "broken.lance"
    bad.mkdir()
    (bad / "garbage").write_text("x")
    node = LanceReader(LanceReader.Params(input_path=str(bad)), "pipeline > LanceReader")
    with pytest.raises(NodeError, match="cannot open .* as lance"):
        node.apply([], RunContext())


def test_select_missing_column_is_node_error(ray_session, sample_dir):
    node = LanceReader(LanceReader.Params(input_path=str(sample_dir / "scored_input.lance"), select_cols=["nope"]), "pipeline > LanceReader")
    with pytest.raises(NodeError, match="'nope'"):
        node.apply([], RunContext())


# --- Spark schema hints over nested Parquet (the code-data tokenization recipe)

FILE = pa.struct([("path", pa.string()), ("is_generated", pa.bool_()), ("n_lines", pa.int32()), ("stars", pa.int64())])
CODE_DDL = ("id BIGINT, repo STRING, score DOUBLE, is_test BOOLEAN, "
            "files ARRAY<STRUCT<path: STRING, is_generated: BOOLEAN, n_lines: INT, stars: BIGINT>>")
CODE_SCHEMA = pa.schema([("id", pa.int64()), ("repo", pa.string()), ("score", pa.float64()), ("is_test", pa.bool_()),
                         ("files", pa.list_(FILE))])


def _code_rows(start: int, n: int, file_type: pa.DataType = FILE) -> pa.Table:
    """Rows shaped like the recipe's input: nested file lists with boolean and
    integer fields, some null, some empty, some lists null."""
    rows = range(start, start + n)
    files = [None if i % 7 == 3 else [] if i % 5 == 0 else
             [{"path": f"src/m{i}.py", "is_generated": i % 3 == 0, "n_lines": 10 * i, "stars": 2**40 + i},
              {"path": "README.md", "is_generated": None, "n_lines": None, "stars": 0}] for i in rows]
    table = pa.table({
        "id": list(rows),
        "repo": [f"org/r{i % 4}" for i in rows],
        "score": [((i * 37) % 100) / 10 for i in rows],
        "is_test": [None if i % 6 == 1 else i % 2 == 0 for i in rows],
        "files": files,
    }, schema=CODE_SCHEMA)
    return table.set_column(4, "files", table["files"].cast(pa.list_(file_type)))


def _spark_output_dir(path, parts: list[pa.Table]):
    path.mkdir()
    for i, part in enumerate(parts):
        pq.write_table(part, path / f"part-{i:05d}-c0ffee.snappy.parquet")
    (path / "_SUCCESS").write_text("")
    return path


def test_spark_schema_over_nested_booleans_through_filter_by_ratio(run_pipeline, tmp_path):
    # Two Spark writes: the second lists the struct fields in another order.
    reordered = pa.struct([FILE.field(i) for i in (2, 0, 3, 1)])
    src = _spark_output_dir(tmp_path / "code_parquet", [_code_rows(0, 30), _code_rows(30, 30, reordered)])
    out = tmp_path / "code.lance"
    run_pipeline({"pipeline": {"type": "LanceWriter", "output_path": str(out), "child_configs": [{
        "type": "FilterByRatio", "column": "score", "keep_ratio": 0.5, "child_configs": [{
            "type": "LanceReader", "input_path": str(src), "input_format": "parquet", "schema": CODE_DDL,
            "mergeSchema": True}]}]}})

    plain = pa.concat_tables([pq.read_table(f).cast(CODE_SCHEMA) for f in sorted(src.glob("*.parquet"))])
    top_half = sorted(plain["score"].to_pylist())[30]  # the scores are distinct
    expected = plain.filter(pc.greater_equal(plain["score"], top_half))
    written = read_lance(out).sort_by("id")
    assert written.num_rows == 30
    # Exactly what pyarrow reads: booleans stay booleans, ints ints, structs whole.
    assert written.schema.equals(plain.schema)
    assert written["files"].to_pylist() == expected["files"].to_pylist()
    assert written["is_test"].to_pylist() == expected["is_test"].to_pylist()
    assert written.select(["id", "repo", "score"]).equals(expected.select(["id", "repo", "score"]))


def test_spark_schema_hint_parses_and_bad_hint_is_a_validation_error():
    from flows.config import ConfigError, parse_config

    as_json = {"type": "struct", "fields": [
        {"name": "id", "type": "long", "nullable": True, "metadata": {}},
        {"name": "repo", "type": "string", "nullable": True, "metadata": {}},
        {"name": "score", "type": "double", "nullable": True, "metadata": {}},
        {"name": "is_test", "type": "boolean", "nullable": True, "metadata": {}},
        {"name": "files", "nullable": True, "metadata": {}, "type": {"type": "array", "containsNull": True, "elementType": {
            "type": "struct", "fields": [
                {"name": "path", "type": "string", "nullable": True, "metadata": {}},
                {"name": "is_generated", "type": "boolean", "nullable": True, "metadata": {}},
                {"name": "n_lines", "type": "integer", "nullable": True, "metadata": {}},
                {"name": "stars", "type": "long", "nullable": True, "metadata": {}}]}}}]}
    ddl = parse_spark_schema(CODE_DDL)
    assert ddl.equals(parse_spark_schema(as_json)) and ddl.equals(parse_spark_schema(json.dumps(as_json)))
    assert ddl.equals(CODE_SCHEMA)
    assert parse_spark_schema("`a b` DECIMAL(12,3) NOT NULL COMMENT 'x, y', m MAP<STRING, ARRAY<INT>>") == pa.schema(
        [("a b", pa.decimal128(12, 3)), ("m", pa.map_(pa.string(), pa.list_(pa.int32())))])

    reader = {"type": "LanceReader", "input_path": "x.parquet"}
    assert parse_config({"pipeline": {**reader, "schema": as_json}}).root.params.spark_schema == as_json
    for bad, why in (("id BIGINT, text STRNG", "'strng'"), ("files ARRAY<STRUCT<path: STRING>", "expected >"),
                     ('{"type": "struct"', "not valid JSON")):
        with pytest.raises(ConfigError) as err:
            parse_config({"pipeline": {**reader, "schema": bad}})
        assert "pipeline > LanceReader: schema: not a Spark schema" in str(err.value) and why in str(err.value)

    # Never a cast that changes a value's meaning; names are matched exactly.
    data = pa.schema([("n", pa.int64()), ("flags", pa.list_(pa.struct([("ok", pa.int64())]))), ("Text", pa.string())])
    assert fit_to_hint(data, parse_spark_schema("n INT, flags ARRAY<STRUCT<ok: DOUBLE>>")).field("flags").type == \
        pa.list_(pa.struct([("ok", pa.float64())]))
    for hint, where in (("flags ARRAY<STRUCT<ok: BOOLEAN>>", "flags[].ok"), ("n STRING", "n"), ("text STRING", "'Text'")):
        with pytest.raises(ValueError, match=re.escape(where)):
            fit_to_hint(data, parse_spark_schema(hint))


def test_spark_schema_hint_reads_like_spark(ray_session, tmp_path):
    # Columns and nested fields as the hint lists them: others dropped,
    # absent ones null, integers widened, the data's own types kept.
    part = _code_rows(0, 12)
    part = part.set_column(0, "id", part["id"].cast(pa.int32()))
    src = _spark_output_dir(tmp_path / "pq", [part])
    stream, table = read(LanceReader, input_path=str(src / "*.parquet"),
                         schema="score DOUBLE, id BIGINT, files ARRAY<STRUCT<is_generated: BOOLEAN, path: STRING>>, lang STRING")
    assert stream.schema.names == table.column_names == ["score", "id", "files", "lang"]
    table = table.sort_by("id")
    assert table["id"].type == pa.int64() and table["id"].to_pylist() == list(range(12))
    assert table["lang"].null_count == 12
    assert table["files"].to_pylist() == [
        None if f is None else [{"is_generated": x["is_generated"], "path": x["path"]} for x in f]
        for f in part["files"].to_pylist()]

    # A boolean the data holds as an integer is refused, not cast.
    ints = _code_rows(12, 4, pa.struct([FILE.field(0), ("is_generated", pa.int64()), FILE.field(2), FILE.field(3)]))
    pq.write_table(ints, tmp_path / "ints.parquet")
    with pytest.raises(NodeError, match=r"pipeline > LanceReader: schema does not fit .*ints.parquet.*files\[\]\.is_generated"):
        read(LanceReader, input_path=[str(src), str(tmp_path / "ints.parquet")], input_format="parquet", schema=CODE_DDL)

    # CSV is text: the hint decides how a column is parsed (leading zeros kept).
    (tmp_path / "zips.csv").write_text("zip,n\n01234,1\n98765,2\n")
    _, table = read(FormatReader, input_path=str(tmp_path / "zips.csv"), data_format="csv", schema="zip STRING, n INT")
    assert table.schema == pa.schema([("zip", pa.string()), ("n", pa.int32())])
    assert sorted(table["zip"].to_pylist()) == ["01234", "98765"]
