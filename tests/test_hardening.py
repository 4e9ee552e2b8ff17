"""Careless or hostile configs: each is one clear message, exit 2, no
traceback, no hang, nothing written. Through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_config_errors import assert_user_error, run_cli


def run_raw(tmp_path, data: bytes, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(data)
    return subprocess.run(
        [sys.executable, str(ROOT / "flows" / "run.py"), "--config", str(cfg), "--no-sample-data", *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, **(env or {})},
    )


BOMB = "\n".join(
    [f"l0: &l0 {['x'] * 9}"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
) + "\npipeline: {type: LanceWriter, output_path: out.lance, tags: *l8}\n"


@pytest.mark.parametrize(
    "data, needle",
    [
        (BOMB.encode(), "aliases"),
        (b"pipeline:\n  type: LanceWriter\n  output_path: a.lance\n  output_path: b.lance\n", "duplicate key 'output_path'"),
        (b"pipeline: {type: LanceReader, input_path: x}\npipeline: {type: LanceReader}\n", "duplicate key 'pipeline'"),
        ("pipeline: {type: LanceReader, input_path: café}".encode("latin-1"), "not UTF-8"),
        ("pipeline: {type: LanceReader, input_path: x}".encode("utf-16"), "not UTF-8"),
        (bytes(range(256)), "not UTF-8"),
        (b"pipeline: " + b"[" * 1000 + b"]" * 1000, "nested more than"),
        (b"ray: fast\npipeline: {type: LanceReader, input_path: x}\n", "'ray:' must be a mapping"),
        (b"prefect: [1]\npipeline: {type: LanceReader, input_path: x}\n", "'prefect:' must be a mapping"),
        (b"prefect: {retries: -1}\npipeline: {type: LanceReader, input_path: x}\n", "retries"),
    ],
    ids=["alias-bomb", "duplicate-key", "duplicate-pipeline", "latin-1", "utf-16", "binary", "deep-yaml",
         "ray-string", "prefect-list", "negative-retries"],
)
def test_hostile_files_are_rejected_fast(tmp_path, data, needle):
    proc = run_raw(tmp_path, data, "--check")
    assert_user_error(proc, needle)


@pytest.mark.parametrize("levels, needle", [(70, "more than 64 nodes deep"), (200, "nested more than 200 levels")])
def test_a_tree_too_deep_is_rejected(tmp_path, levels, needle):
    import json

    node: dict = {"type": "LanceReader", "input_path": "x.lance"}
    for _ in range(levels):
        node = {"type": "Filter", "column": "score", "child_configs": [node]}
    proc = run_raw(tmp_path, json.dumps({"pipeline": node}).encode(), "--check")
    assert_user_error(proc, needle)


def test_storage_options_string_is_not_echoed(tmp_path, sample_dir):
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceReader
          input_path: {sample_dir}/scored_input.lance
          storage_options: "aws_secret_access_key=PLANTED-SECRET-123"
        """, "--check")
    assert_user_error(proc, "storage_options", "not shown")
    assert "PLANTED-SECRET-123" not in proc.stderr + proc.stdout


def test_check_runs_the_metadata_checks_of_a_run(tmp_path, sample_dir):
    existing = tmp_path / "exists.lance"
    import lance
    import pyarrow as pa

    lance.write_dataset(pa.table({"a": [1]}), str(existing))
    (tmp_path / "plain_file").write_text("x")
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: UnionByName
          child_configs:
            - type: LanceWriter
              output_path: {existing}
              mode: create
              child_configs:
                - type: LanceReader
                  input_path: {tmp_path}/missing.lance
            - type: LanceWriter
              output_path: {sample_dir}/scored_input.lance/inside.lance
              child_configs:
                - type: LanceReader
                  input_path: {sample_dir}/scored_input.lance
            - type: LanceWriter
              output_path: {tmp_path}/plain_file/out.lance
              child_configs:
                - type: LanceReader
                  input_path: {tmp_path}/nothing-*.parquet
        """, "--check")
    assert_user_error(
        proc, "missing.lance", "already exists", "is inside the input", "nothing-*.parquet", "plain_file' is a file",
    )
    assert "config OK" not in proc.stdout


def test_unreachable_ray_address_fails_in_bounded_time(tmp_path, sample_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"ray:\n  address: 127.0.0.1:9\npipeline:\n  type: LanceReader\n  input_path: {sample_dir}/scored_input.lance\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "run.py"), "--config", str(cfg), "--no-sample-data"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "KAIYUAN_CONNECT_TIMEOUT_S": "5"},
    )
    assert_user_error(proc, "127.0.0.1:9", "cannot reach a Ray cluster")


def test_unknown_ray_init_keyword(tmp_path, sample_dir):
    proc = run_cli(tmp_path, f"""
        ray:
          init_kwargs: {{num_cpu: 2}}
        pipeline:
          type: LanceReader
          input_path: {sample_dir}/scored_input.lance
        """)
    assert_user_error(proc, "ray.init_kwargs", "'num_cpu'", "did you mean 'num_cpus'")


def test_unreachable_prefect_api_fails_in_bounded_time(tmp_path, sample_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pipeline:\n  type: LanceReader\n  input_path: {sample_dir}/scored_input.lance\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "run.py"), "--config", str(cfg), "--no-sample-data"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "KAIYUAN_CONNECT_TIMEOUT_S": "5", "PREFECT_API_URL": "http://user:pw@127.0.0.1:9/api"},
    )
    assert_user_error(proc, "PREFECT_API_URL 'http://127.0.0.1:9/api'", "no Prefect API answers")
    assert "pw@" not in proc.stderr


def test_a_node_error_is_not_retried(run_pipeline, sample_dir, tmp_path):
    import time

    from tests.test_foundation import _task_runs

    config = {
        "prefect": {"retries": 2, "retry_delay_seconds": 0},
        "pipeline": {"type": "LanceWriter", "output_path": str(tmp_path / "o.lance"), "child_configs": [
            {"type": "Filter", "column": "text", "child_configs": [
                {"type": "LanceReader", "input_path": str(sample_dir / "scored_input.lance")}]}]},
    }
    state = run_pipeline(config, return_state=True)
    assert state.is_failed()
    deadline = time.monotonic() + 15  # task-run events reach the API in batches, up to a second late
    while True:
        runs = _task_runs(state.state_details.flow_run_id, expect=2)
        filter_run = next((r for r in runs if r.name.endswith("> Filter")), None)
        if (filter_run is not None and filter_run.state.is_final()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert filter_run is not None and filter_run.state.is_failed() and filter_run.run_count == 1  # a NodeError: no retry
