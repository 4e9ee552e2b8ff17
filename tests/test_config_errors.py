"""Bad configs: one clear paragraph naming the node, non-zero exit, no
traceback, nothing written. These run the real CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.config import ConfigError, load_config, parse_config
from tests.conftest import ROOT


def run_cli(tmp_path: Path, text: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI on ``text`` as a config; ``env``: PREFECT_* (and other)
    settings replacing this process's PREFECT_* ones."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(textwrap.dedent(text))
    full = {k: v for k, v in os.environ.items() if not (env and k.startswith("PREFECT_"))}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "flows" / "run.py"), "--config", str(cfg), "--no-sample-data", *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=full,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_unknown_type_suggests_nearest(tmp_path, sample_dir):
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceWriter
          output_path: {tmp_path}/out.lance
          child_configs:
            - type: FilterByRatoi
              column: score
              child_configs:
                - type: LanceReader
                  input_path: {sample_dir}/scored_input.lance
        """)
    assert_user_error(proc, "pipeline > child_configs[0] > FilterByRatoi", "unknown node type")
    assert not (tmp_path / "out.lance").exists()


def test_misspelt_parameter(tmp_path, sample_dir):
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceWriter
          output_path: {tmp_path}/out.lance
          child_configs:
            - type: Filter
              colum: score
              child_configs:
                - type: LanceReader
                  input_path: {sample_dir}/scored_input.lance
        """)
    assert_user_error(proc, "pipeline > child_configs[0] > Filter", "unknown parameter 'colum'", "did you mean 'column'")
    assert not (tmp_path / "out.lance").exists()


def test_string_where_number_belongs(tmp_path, sample_dir):
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceWriter
          output_path: {tmp_path}/out.lance
          child_configs:
            - type: Filter
              column: score
              threshold: "0.5"
              child_configs:
                - type: LanceReader
                  input_path: {sample_dir}/scored_input.lance
        """)
    assert_user_error(proc, "pipeline > child_configs[0] > Filter", "threshold")
    assert not (tmp_path / "out.lance").exists()


def test_missing_pipeline_key(tmp_path):
    proc = run_cli(tmp_path, """
        ray:
          app_name: x
        """)
    assert_user_error(proc, "missing the 'pipeline:' key")


def test_yaml_syntax_error(tmp_path):
    proc = run_cli(tmp_path, """
        pipeline:
          type: LanceWriter
          output_path: [unclosed
        """)
    assert_user_error(proc, "YAML syntax error", "line")


def test_missing_input_path(tmp_path):
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceWriter
          output_path: {tmp_path}/out.lance
          child_configs:
            - type: LanceReader
              input_path: {tmp_path}/nope.lance
        """)
    assert_user_error(proc, "pipeline > child_configs[0] > LanceReader", "does not exist")
    assert not (tmp_path / "out.lance").exists()


def test_unknown_write_mode_and_child_count(tmp_path, sample_dir):
    proc = run_cli(tmp_path, f"""
        pipeline:
          type: LanceWriter
          output_path: {tmp_path}/out.lance
          mode: overwrit
          child_configs:
            - type: LanceReader
              input_path: {sample_dir}/scored_input.lance
              child_configs:
                - type: LanceReader
                  input_path: {sample_dir}/scored_input.lance
        """)
    # every problem is reported at once
    assert_user_error(proc, "mode", "overwrite", "LanceReader: takes no children")


def test_check_prints_tree_without_running(tmp_path, sample_dir):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"""
pipeline:
  type: LanceWriter
  output_path: {tmp_path}/out.lance
  child_configs:
    - type: LanceReader
      input_path: {sample_dir}/scored_input.lance
      mergeSchema: true
""")
    proc = subprocess.run([sys.executable, str(ROOT / "flows/run.py"), "--config", str(cfg), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LanceWriter(" in proc.stdout and "  LanceReader(" in proc.stdout
    assert not (tmp_path / "out.lance").exists()


def test_spark_section_and_ignored_knobs_are_accepted():
    cfg = parse_config({
        "spark": {"app_name": "old", "master": "local[*]"},
        "pipeline": {"type": "LanceReader", "input_path": "x.lance", "mergeSchema": True, "datetimeRebaseModeInRead": "CORRECTED"},
    })
    assert cfg.ray.app_name == "old"
    assert cfg.root.type_name == "LanceReader"


def test_max_write_blocks_is_accepted_and_logged_as_without_effect(caplog):
    reader = {"type": "LanceReader", "input_path": "x"}
    with caplog.at_level("INFO", logger="kaiyuan.config"):
        parse_config({"pipeline": reader})
    assert "max_write_blocks" not in caplog.text  # the default says nothing
    with caplog.at_level("INFO", logger="kaiyuan.config"):
        cfg = parse_config({"ray": {"data": {"max_write_blocks": 16}}, "pipeline": reader})
    assert cfg.ray.data.max_write_blocks == 16
    assert "ray.data: max_write_blocks accepted, no effect" in caplog.text and "num_output_files" in caplog.text
    with pytest.raises(ConfigError) as err:
        parse_config({"ray": {"data": {"max_write_blocks": "many"}}, "pipeline": reader})
    assert "max_write_blocks" in str(err.value)


def test_non_positive_data_settings_mean_unset():
    cfg = parse_config({"ray": {"data": {"batch_size": 0, "concurrency": -1}}, "pipeline": {"type": "LanceReader", "input_path": "x"}})
    assert cfg.ray.data.batch_size is None and cfg.ray.data.concurrency is None


def test_missing_required_parameter_names_node():
    with pytest.raises(ConfigError) as err:
        parse_config({"pipeline": {"type": "LanceWriter", "child_configs": [{"type": "LanceReader", "input_path": "x"}]}})
    assert "pipeline > LanceWriter: missing required parameter 'output_path'" in str(err.value)


def test_examples_validate():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        load_config(path)


def test_shuffle_strategy_default_and_bad_value():
    reader = {"type": "LanceReader", "input_path": "x"}
    assert parse_config({"pipeline": reader}).ray.data.shuffle_strategy == "sort_shuffle_pull_based"
    assert parse_config({"ray": {"data": {"shuffle_strategy": "shuffle_v2"}}, "pipeline": reader}).ray.data.shuffle_strategy == "shuffle_v2"
    with pytest.raises(ConfigError) as err:
        parse_config({"ray": {"data": {"shuffle_strategy": "hash"}}, "pipeline": reader})
    assert "shuffle_strategy" in str(err.value) and "sort_shuffle_pull_based" in str(err.value)
