"""What a user sees of a run: row-based progress, the nodes' own log lines in
the Prefect run, and a quiet console (issue: progress, logs, console)."""

import time

import pytest

from tests.test_config_errors import run_cli

pytestmark = pytest.mark.xdist_group("ray")


def reader(path):
    return {"type": "LanceReader", "input_path": str(path)}


def test_progress_is_rows_read_against_the_inputs_row_counts(run_pipeline, sample_dir, tmp_path):
    """Listeners see rows read at the leaves, never past the total, ending at
    the inputs' row count (from Lance metadata, known before the run)."""
    import lance

    from flows import report

    src = sample_dir / "scored_input.lance"
    total = lance.dataset(str(src)).count_rows()
    seen: list[tuple[int, int]] = []
    report.PROGRESS_LISTENERS.append(lambda read, of: seen.append((read, of)))
    try:
        run_pipeline({"prefect": {"progress_after_s": 0}, "pipeline": {
            "type": "LanceWriter", "output_path": str(tmp_path / "out.lance"),
            "child_configs": [{"type": "UnionByPosition", "child_configs": [reader(src), reader(src)]}]}})
    finally:
        report.PROGRESS_LISTENERS.clear()
    assert seen and seen[-1] == (2 * total, 2 * total)
    reads = [read for read, _ in seen]
    assert reads == sorted(reads) and all(of == 2 * total for _, of in seen)


def test_expected_rows_from_metadata(sample_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.base import NODE_TYPES, RunContext

    table = pa.table({"id": list(range(25)), "text": ["x"] * 25})
    pq.write_table(table.slice(0, 10), tmp_path / "a.parquet")
    pq.write_table(table.slice(10), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_text('{"id": 1}\n')

    def rows(cls, path, **params):
        node = NODE_TYPES[cls](NODE_TYPES[cls].Params(input_path=str(path), **params), "p")
        return node.expected_rows(RunContext())

    assert rows("FormatReader", tmp_path / "*.parquet", data_format="parquet") == 25
    assert rows("LanceReader", sample_dir / "scored_input.lance") > 0
    assert rows("JsonReader", tmp_path / "c.jsonl") is None  # not in metadata: unknown, not guessed


def test_node_log_lines_reach_the_prefect_task_run(run_pipeline, sample_dir, tmp_path):
    """A kaiyuan.* line logged while a node task runs (FilterByRatio's kept
    count) is in that task run's Prefect logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.test_foundation import _latest_flow_run

    run_pipeline({"pipeline": {
        "type": "LanceWriter", "output_path": str(tmp_path / "out.lance"),
        "child_configs": [{"type": "FilterByRatio", "column": "fasttext_score", "keep_ratio": 0.5,
                           "child_configs": [reader(sample_dir / "scored_input.lance")]}]}})
    flow_run = _latest_flow_run()
    deadline = time.monotonic() + 30
    while True:  # logs reach the API in batches
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        kept = [log for log in logs if log.name.startswith("kaiyuan") and "keeping" in log.message]
        if kept or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert kept, [(log.name, log.message[:80]) for log in logs]
    assert kept[0].task_run_id is not None and "FilterByRatio" in kept[0].message


def test_console_is_quiet_by_default(sample_dir, tmp_path):
    """The CLI prints one line per node and the result; Prefect's, Ray's and
    Lance's chatter stays in the run's logs unless --verbose."""
    import yaml

    text = yaml.safe_dump({"pipeline": {"type": "LanceWriter", "output_path": str(tmp_path / "out.lance"),
                                        "child_configs": [reader(sample_dir / "scored_input.lance")]}})
    import os

    # As a user runs it: Prefect's default log level (INFO), this suite's API.
    proc = run_cli(tmp_path, text, "--show-rows", "2", env={"PREFECT_API_URL": os.environ["PREFECT_API_URL"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "pipeline > LanceWriter: rows in" in err and "pipeline > child_configs[0] > LanceReader: rows in" in err
    assert "rows: " in proc.stdout and "output: " in proc.stdout
    for noise in (" INFO ", "| INFO", "Started a local Ray", "will be created", "Execution plan", "not fork-safe", "Token authentication"):
        assert noise not in err, (noise, err[-3000:])
    assert len(err.strip().splitlines()) <= 6, err


def test_artifact_keys_are_per_node_path():
    """Two nodes of one type get their own artifacts (keys by position)."""
    from flows.config import parse_config
    from flows.report import node_key

    cfg = parse_config({"pipeline": {"type": "UnionByPosition", "child_configs": [
        {"type": "LanceReader", "input_path": "a.lance"}, {"type": "LanceReader", "input_path": "b.lance"}]}})
    keys = [node_key("node", spec) for spec in cfg.nodes()]
    assert keys == ["node-0-lancereader", "node-1-lancereader", "node-unionbyposition"]
    deep = {"type": "LanceReader", "input_path": "a.lance"}
    for _ in range(60):
        deep = {"type": "Filter", "column": "x", "child_configs": [deep]}
    long_keys = {node_key("report", spec) for spec in parse_config({"pipeline": deep}).nodes()}
    assert len(long_keys) == 61 and all(len(k) <= 120 for k in long_keys)
