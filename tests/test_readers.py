"""Readers (SPEC §3) and storage options (SPEC §4)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tasks.base import NodeError, RunContext
from tasks.readers import FormatReader, JsonlZstReader, LanceReader, NpyReader, detect_format
from tasks.storage import StorageConfigError, env_storage_options, normalize_uri, resolve_storage_options


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
