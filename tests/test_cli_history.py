"""The README's main command, end to end as a user runs it: the CLI on the
default example, twice, then `prefect server start` over the same local
database (the README's next step) serves both runs, each with one task run
per node, to Prefect's own CLI and client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import lance

from tests.conftest import ROOT
from tests.processes import Service, free_port


def test_main_job_twice_then_history_in_prefect_db(tmp_path, repo_sample_data):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200")
    out = tmp_path / "rw.lance"
    cfg = tmp_path / "rw.yaml"
    cfg.write_text((ROOT / "examples" / "read_write.yaml").read_text().replace("data/output/read_write.lance", str(out)))
    for _ in range(2):
        proc = subprocess.run([sys.executable, "flows/run.py", "--config", str(cfg), "--show-rows", "3"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "rows: 10000" in proc.stdout
    assert lance.dataset(str(out)).count_rows() == lance.dataset(str(repo_sample_data / "pcmind_kaiyuan_2b_sample.lance")).count_rows()

    # One server for both queries below: without PREFECT_API_URL each `prefect`
    # command would start a temporary server of its own (13-17 s here).
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = Service("prefect-server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     {**env, "PREFECT_UI_ENABLED": "false"}, tmp_path)
    try:
        server.wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200, "Prefect API health")
        client_env = {**env, "PREFECT_API_URL": api}
        ls = subprocess.run([prefect, "flow-run", "ls"], cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=200)
        assert ls.returncode == 0, ls.stderr
        assert ls.stdout.count("read_write-") == 2, ls.stdout

        code = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs()
        out = []
        for r in runs:
            trs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
            out.append([r.name, r.state_type.value, sorted(t.name for t in trs)])
        print(json.dumps(out))
asyncio.run(main())
"""
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=200)
    finally:
        server.stop(grace=5)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(runs) == 2
    for name, state, task_names in runs:
        assert name.startswith("read_write-") and state == "COMPLETED"
        assert task_names == ["pipeline > LanceWriter", "pipeline > child_configs[0] > LanceReader"]


def test_node_failure_via_cli_names_node_without_traceback(tmp_path, sample_dir, ray_session):
    """A node that fails inside its transform, through the CLI. The run joins
    this session's Ray and Prefect API (`--ray-address`, PREFECT_API_URL):
    the start-up of a fresh local run is covered above, the subject here is
    how the failure reaches the user."""
    from prefect.settings import get_current_settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=get_current_settings().api.url)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"""
pipeline:
  type: LanceWriter
  output_path: {tmp_path}/out.lance
  child_configs:
    - type: Filter
      column: text
      child_configs:
        - type: LanceReader
          input_path: {sample_dir}/scored_input.lance
""")
    proc = subprocess.run([sys.executable, "flows/run.py", "--config", str(cfg),
                           "--ray-address", ray_session.get_runtime_context().gcs_address],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: node failed: pipeline > child_configs[0] > Filter: column 'text' is string, not numeric" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-4000:]
    assert not (tmp_path / "out.lance").exists()
