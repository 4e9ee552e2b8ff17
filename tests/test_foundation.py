"""End-to-end runs of the foundation nodes through the real Prefect flow."""

from __future__ import annotations

import lance
import pyarrow as pa
import pytest

from tests.conftest import read_lance


def reader(path, **kw):
    return {"type": "LanceReader", "input_path": str(path), **kw}


def writer(path, child, **kw):
    return {"type": "LanceWriter", "output_path": str(path), **kw, "child_configs": [child]}


def test_read_write_roundtrip_keeps_rows_and_nested_columns(run_pipeline, sample_dir, tmp_path):
    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    out = tmp_path / "out.lance"
    result = run_pipeline({"ray": {"app_name": "rw"}, "pipeline": writer(out, reader(src))})
    original = read_lance(src)
    written = read_lance(out)
    assert result["num_rows"] == original.num_rows == written.num_rows
    assert written.schema.equals(original.schema, check_metadata=False)
    # list and struct columns pass through intact
    assert written.column("text_tokenized").to_pylist() == original.column("text_tokenized").to_pylist()
    assert written.column("conversation").to_pylist() == original.column("conversation").to_pylist()
    assert written.column("metadata").to_pylist() == original.column("metadata").to_pylist()
    counts = {n["type"]: (n["rows_in"], n["rows_out"]) for n in result["nodes"]}
    assert counts["LanceWriter"] == (original.num_rows, original.num_rows)
    assert counts["LanceReader"][1] == original.num_rows
