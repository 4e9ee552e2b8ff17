"""End-to-end runs of the foundation nodes through the real Prefect flow."""

from __future__ import annotations

import lance
import pytest

from tests.conftest import node_stats, read_lance, write_config


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


def _artifacts(flow_run_id=None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])) if flow_run_id else None
        return client.read_artifacts(artifact_filter=flt)


def _latest_flow_run():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]


def _task_runs(flow_run_id, expect: int):
    """The flow run's task runs, once ``expect`` of them are recorded: the
    local API writes task-run events in batches, at most a second late
    (flows/runtime.py), so a read right after the run may see fewer."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 15
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) >= expect or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def test_reports_are_artifacts_and_counts_per_node(run_pipeline, sample_dir, tmp_path):
    cfg = {
        "ray": {"app_name": "vis-test"},
        "prefect": {"progress_after_s": 600},  # longer than this run: no progress artifact
        "pipeline": {
            "type": "Visualizer", "num_rows": 3,
            "child_configs": [{
                "type": "Stat",
                "child_configs": [{
                    "type": "Filter", "column": "fasttext_score", "comparison": ">=", "threshold": 0.3,
                    "child_configs": [reader(sample_dir / "pcmind_kaiyuan_2b_sample.lance", select_cols=["id", "text", "fasttext_score", "text_tokenized"])],
                }],
            }],
        },
    }
    result = run_pipeline(cfg)
    src = read_lance(sample_dir / "pcmind_kaiyuan_2b_sample.lance")
    expected = sum(1 for v in src["fasttext_score"].to_pylist() if v >= 0.3)
    assert result["num_rows"] == expected
    nodes = {n["type"]: n for n in result["nodes"]}
    assert nodes["Filter"]["rows_in"] == src.num_rows and nodes["Filter"]["rows_out"] == expected
    assert nodes["Stat"]["rows_out"] == expected and nodes["Visualizer"]["rows_out"] == expected
    assert len(result["preview"]) == 20  # the CLI's preview, independent of the Visualizer
    run = _latest_flow_run()
    assert run.name.startswith("vis-test-")
    tasks = _task_runs(run.id, expect=4)
    assert len(tasks) == 4  # one task run per node
    assert {t.name for t in tasks} == {"pipeline > Visualizer", "pipeline > child_configs[0] > Stat",
                                       "pipeline > child_configs[0] > child_configs[0] > Filter",
                                       "pipeline > child_configs[0] > child_configs[0] > child_configs[0] > LanceReader"}
    arts = _artifacts(run.id)
    keys = {a.key for a in arts}
    assert "run-summary" in keys and "report-0-stat" in keys and "report-visualizer" in keys
    summary = next(a for a in arts if a.key == "run-summary").data
    assert f"Filter: rows in {src.num_rows:,} → out {expected:,}" in summary
    stat = next(a for a in arts if a.key == "report-0-stat").data
    assert f"**rows:** {expected}" in stat and "text_tokenized" in stat
    vis = next(a for a in arts if a.key == "report-visualizer").data
    assert "first 3 rows" in vis and vis.count("\n| ") == 4  # header row + 3 data rows
    by_task = {a.task_run_id: a for a in arts if a.key.startswith("node-")}
    assert {t.id for t in tasks} <= set(by_task)  # every node's task run has its row counts
    filter_task = next(t for t in tasks if t.name.endswith("Filter"))
    filter_art = by_task[filter_task.id].data
    assert node_stats(filter_art)["rows in"] == f"{src.num_rows:,}" and node_stats(filter_art)["rows out"] == f"{expected:,}"
    assert "| threshold | 0.3 |" in filter_art and "| comparison | >= |" in filter_art  # its parameters
    assert not any(a.type == "progress" for a in arts)  # the run was shorter than prefect.progress_after_s


def test_node_failure_names_the_node(run_pipeline, sample_dir, tmp_path):
    from flows.errors import user_message

    cfg = {"pipeline": writer(tmp_path / "o.lance", {"type": "Filter", "column": "text", "child_configs": [reader(sample_dir / "scored_input.lance")]})}
    with pytest.raises(BaseException) as err:
        run_pipeline(cfg)
    message = user_message(err.value)
    assert message is not None and "pipeline > child_configs[0] > Filter" in message and "not numeric" in message
    assert not (tmp_path / "o.lance").exists()
    # The failed run still has each node's outcome and parameters, and its summary tree.
    run = _latest_flow_run()
    arts = {a.key: a.data for a in _artifacts(run.id)}
    assert node_stats(arts["node-0-0-lancereader"])["status"] == "ran"
    assert node_stats(arts["node-0-filter"])["status"] == "failed" and "| column | text |" in arts["node-0-filter"]
    assert node_stats(arts["node-lancewriter"])["status"] == "not run"
    assert node_stats(arts["node-0-filter"])["rows out"] == "–"  # no partial counts
    assert "Filter: rows in – → out –, 0.00s  [failed]" in arts["run-summary"]


def test_read_if_exists_computes_nothing_below(run_pipeline, sample_dir, tmp_path):
    out = tmp_path / "cached.lance"
    first = run_pipeline({"pipeline": writer(out, reader(sample_dir / "scored_input.lance"), mode="read_if_exists")})
    version = lance.dataset(str(out)).version
    # Second run: the child would now fail (its input is gone), proving it is never computed.
    cfg = {"pipeline": writer(out, {"type": "Filter", "column": "fasttext_score",
                                     "child_configs": [reader(sample_dir / "scored_input.lance")]}, mode="read_if_exists")}
    second = run_pipeline(cfg)
    assert second["num_rows"] == first["num_rows"]
    assert lance.dataset(str(out)).version == version
    statuses = {n["type"]: n["status"] for n in second["nodes"]}
    assert statuses["Filter"].startswith("skipped") and statuses["LanceReader"].startswith("skipped")


def test_same_seed_same_output(run_pipeline, sample_dir, tmp_path):
    cfg = lambda out: {"ray": {"seed": 11}, "pipeline": writer(out, {"type": "Shuffler", "child_configs": [reader(sample_dir / "scored_input.lance")]})}
    run_pipeline(cfg(tmp_path / "a.lance"))
    run_pipeline(cfg(tmp_path / "b.lance"))
    a, b = read_lance(tmp_path / "a.lance"), read_lance(tmp_path / "b.lance")
    assert a.equals(b)
    assert a["id"].to_pylist() != sorted(a["id"].to_pylist())


def _node_task_functions_exported() -> int:
    """How often prefect-ray's task entry point was exported to this Ray
    job's GCS function table (one entry per distinct remote function)."""
    import pickle

    import ray
    from ray._private.ray_constants import KV_NAMESPACE_FUNCTION_TABLE
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    prefix = f"RemoteFunction:{ray.get_runtime_context().get_job_id()}:".encode()
    entries = (_internal_kv_get(key, namespace=KV_NAMESPACE_FUNCTION_TABLE)
               for key in _internal_kv_list(prefix, namespace=KV_NAMESPACE_FUNCTION_TABLE))
    return sum(1 for value in entries if value and "_run_prefect_task" in pickle.loads(value)["function_name"])


def test_node_tasks_share_one_ray_function(run_pipeline, sample_dir, tmp_path):
    """prefect-ray wraps its entry point in a new ray.remote per task (a new
    function ID each: a GCS export, a new worker lease and a function fetch
    per node task). Ours reuses one: a second run of a 4-node tree exports
    nothing new, and all its node tasks share one worker lease."""
    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    config = {"pipeline": writer(tmp_path / "out.lance", {
        "type": "ColumnSelect", "select_cols": ["id", "text"],
        "child_configs": [{"type": "Filter", "column": "id", "comparison": "larger", "threshold": 10,
                           "child_configs": [reader(src)]}],
    }, mode="overwrite")}
    run_pipeline(config)
    before = _node_task_functions_exported()
    result = run_pipeline(config)
    assert result["num_rows"] > 0
    assert before >= 1
    assert _node_task_functions_exported() == before


def test_node_task_context_needs_no_prefect_collections(ray_session):
    """The context a node task is run in is rebuilt in its Ray worker without
    importing every installed Prefect collection. Shipped as a dict, the flow
    run's result store named its storage block by slug, and rebuilding that
    made the first node task in each worker import prefect-kubernetes and its
    Kubernetes client (1.2 s)."""
    import uuid

    import ray
    from prefect import flow

    from flows.build import run_node
    from flows.pipeline import kaiyuan_pipeline
    from flows.prefect_workarounds import task_context

    @flow(persist_result=False, result_storage=kaiyuan_pipeline.result_storage)
    def capture():
        return task_context(run_node, uuid.uuid4(), {})

    context = capture()

    @ray.remote(num_cpus=0)
    def hydrate(context) -> tuple[bool, bool]:
        import sys

        from prefect.context import FlowRunContext, hydrated_context

        with hydrated_context(context):
            has_store = FlowRunContext.get().result_store is not None
        return has_store, "prefect_kubernetes" in sys.modules

    assert ray.get(hydrate.remote(context)) == (True, False)


def test_tags_stay_on_the_flow_run(ray_session, sample_dir, tmp_path):
    """Run as the CLI runs it, inside ``prefect.tags``: the flow run has the
    tags, its node task runs have none. Tagged task runs make Prefect check
    tag concurrency limits for each node task (an API call each and, the
    first time in each Ray worker, a client service started before the node
    runs)."""
    from prefect import tags

    from flows.config import load_config
    from flows.pipeline import flow_run_tags, kaiyuan_pipeline

    path = write_config(tmp_path, {"ray": {"app_name": "tagged"}, "pipeline": writer(tmp_path / "out.lance", reader(sample_dir / "pcmind_kaiyuan_2b_sample.lance"))})
    expected = flow_run_tags(load_config(path))
    with tags(*expected):
        kaiyuan_pipeline(config=str(path), preview_rows=0)
    flow_run = _latest_flow_run()
    assert set(expected) <= set(flow_run.tags)
    task_runs = _task_runs(flow_run.id, expect=2)
    assert len(task_runs) == 2 and all(t.tags == [] for t in task_runs), [t.tags for t in task_runs]
