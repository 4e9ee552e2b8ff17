"""Prefect operations end to end (issue 5): a real `prefect server start`
subprocess, work pools, blocks, `prefect --no-prompt deploy --all`, a process
worker, deployment runs, schedules, retries, checkpoints/resume, the UI in
headless Chromium, and a secret that must never leak.

One server (SQLite) per module, plus one on PostgreSQL when
KAIYUAN_TEST_POSTGRES_URL is set (.ci/run sets it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, fresh_prefect_home, node_stats, read_lance
from tests.processes import free_port

# Generous: under load a server start + deploy --all + one flow run takes minutes.
# One xdist worker runs the whole module: its server stack starts once.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800), pytest.mark.xdist_group("prefect-stack")]

PY = sys.executable
PREFECT = [PY, "-m", "prefect"]
ARTIFACTS = ROOT / ".ci" / "artifacts"
RUN_TIMEOUT = 900


def _base_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        RAY_USAGE_STATS_ENABLED="0",
        KAIYUAN_NUM_CPUS="2",
        PYTHONPATH=str(ROOT),
        COLUMNS="200",
    )
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    """Child processes (recursively) from /proc, so a kill reaches Ray's too."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL, grace: float = 5) -> None:
    """Send ``sig`` to the process and its descendants; whatever is left
    after ``grace`` seconds (a worker or server shutting down slowly) is
    killed."""
    tree = [*_descendants(proc.pid), proc.pid]
    for pid in tree:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


class Stack:
    """A `prefect server start` subprocess (+ a process worker) of our own."""

    def __init__(self, home: Path, db_url: str | None = None, db_template: Path | None = None):
        self.home = home
        self.db_template = db_template  # a migrated SQLite database to start from (conftest)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.db_url = db_url
        self.procs: list[subprocess.Popen] = []
        home.mkdir(parents=True, exist_ok=True)
        self.env = _base_env(PREFECT_HOME=str(home / "client"), PREFECT_API_URL=self.url)

    def start_server(self) -> None:
        env = _base_env(
            PREFECT_HOME=str(self.home / "server"),
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
            PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS="1",
            PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS="1",
            PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
            PREFECT_SERVER_UI_API_URL=self.url,
        )
        if self.db_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.db_url
        elif self.db_template is not None:
            fresh_prefect_home(self.home / "server", self.db_template)
        log = open(self.home / "server.log", "w")
        cmd = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.home))
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 180) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.read().strip() == b"true":
                        return
            except OSError:
                pass
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError("prefect server did not start:\n" + (self.home / "server.log").read_text()[-4000:])

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300, check: bool = True):
        proc = subprocess.run(
            list(args), cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def start_worker(self, pool: str = "kaiyuan-process") -> None:
        log = open(self.home / "worker.log", "w")
        env = {**self.env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        self.procs.append(
            subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        )

    def client(self):
        """A sync Prefect client for this server (a context manager)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.url)

    def run_deployment(self, name: str, params: dict | None = None, job_env: dict | None = None) -> str:
        args = [*PREFECT, "deployment", "run", name]
        if params:
            args += ["--params", json.dumps(params)]
        if job_env:
            args += ["--job-variable", "env=" + json.dumps(job_env)]
        out = self.cli(*args).stdout
        for line in out.splitlines():
            if "UUID:" in line:
                return line.split("UUID:")[1].strip()
        raise AssertionError(out)

    def wait_final(self, flow_run_id, timeout: float = RUN_TIMEOUT):
        deadline = time.time() + timeout
        with self.client() as client:
            while time.time() < deadline:
                run = client.read_flow_run(flow_run_id)
                if run.state and run.state.is_final():
                    return run
                time.sleep(2)
        raise AssertionError(
            f"flow run {flow_run_id} not finished in {timeout}s; worker log:\n"
            + (self.home / "worker.log").read_text()[-6000:]
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                _kill_tree(proc, signal.SIGTERM)


def _setup(stack: Stack, twice: bool = True) -> None:
    """What an operator does on a fresh checkout."""
    # pools (process + kubernetes) and block types, in one idempotent command
    stack.cli(PY, "-m", "deployments.setup", "--no-deploy", "--no-generate")
    if twice:
        stack.cli(PY, "-m", "deployments.setup", "--no-deploy", "--no-generate")  # idempotent
    stack.cli(*PREFECT, "block", "register", "-m", "blocks")
    stack.cli(*PREFECT, "--no-prompt", "deploy", "--all")
    stack.start_worker()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, repo_sample_data, prefect_db_template):
    s = Stack(tmp_path_factory.mktemp("prefect-sqlite"), db_template=prefect_db_template)
    try:
        s.start_server()
        _setup(s)
        yield s
    finally:
        s.stop()


@pytest.fixture  # only one test uses it: stop it right after
def pg_stack(tmp_path_factory, repo_sample_data):
    url = os.environ.get("KAIYUAN_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("KAIYUAN_TEST_POSTGRES_URL not set (.ci/run starts PostgreSQL and sets it)")
    s = Stack(tmp_path_factory.mktemp("prefect-postgres"), db_url=url)
    try:
        s.start_server()
        _setup(s, twice=False)
        yield s
    finally:
        s.stop()


def _node_count(config: Path, overrides: dict | None = None) -> int:
    from flows.config import load_config

    return len(load_config(config, overrides).nodes())


def _task_runs(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _artifacts(client, flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _logs(client, flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs, offset = [], 0
    while True:
        page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset)
        logs += page
        if len(page) < 200:
            return logs
        offset += 200


# ---------------------------------------------------------------------------


def test_prefect_yaml_has_one_deployment_per_example():
    from deployments.generate import render

    assert (ROOT / "prefect.yaml").read_text() == render(), "prefect.yaml is stale: run python -m deployments.generate"
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        name = example.stem.replace("_", "-")
        d = deployments[name]
        assert d["entrypoint"] == "flows/pipeline.py:kaiyuan_pipeline"
        assert d["parameters"]["config"] == f"examples/{example.name}"
        assert d["work_pool"]["name"] == "kaiyuan-process"
        assert deployments[name + "-k8s"]["work_pool"]["name"] == "kaiyuan-k8s"
        assert deployments[name + "-k8s"]["parameters"]["mode"] == "k8s"
    schedules = [s for d in spec["deployments"] for s in d.get("schedules") or []]
    assert {"cron", "interval"} <= {k for s in schedules for k in s}
    assert schedules and all(s["active"] is False for s in schedules)


def _end_to_end(stack: Stack, tmp_path: Path) -> dict:
    out = tmp_path / "e2e.lance"
    # progress_after_s 0: the progress artifact even for this short run
    params = {"overrides": {"pipeline.output_path": str(out), "ray.app_name": "e2e-read-write", "prefect.progress_after_s": 0}}
    flow_run_id = stack.run_deployment("kaiyuan-pipeline/read-write", params)
    run = stack.wait_final(flow_run_id)
    assert run.state.type.value == "COMPLETED", (run.state, (stack.home / "worker.log").read_text()[-6000:])
    assert run.name.startswith("e2e-read-write-")
    assert "config:read_write" in run.tags
    n_nodes = _node_count(ROOT / "examples" / "read_write.yaml")
    with stack.client() as client:
        task_runs = _task_runs(client, flow_run_id)
        artifacts = _artifacts(client, flow_run_id)
    assert len(task_runs) == n_nodes
    assert all(t.state.type.value == "COMPLETED" for t in task_runs)
    nodes = [a for a in artifacts if a.key and a.key.startswith("node-")]
    assert len(nodes) == n_nodes and {a.task_run_id for a in nodes} == {t.id for t in task_runs}
    expected = read_lance(out).num_rows
    writer = next(a for a in nodes if a.key == "node-lancewriter")
    assert node_stats(writer.data)["rows out"] == f"{expected:,}" and expected > 0
    assert f"| output_path | {out} |" in writer.data and "| mode | overwrite |" in writer.data  # its parameters
    keys = {a.key for a in artifacts}
    assert {"run-summary", "node-lancewriter", "node-0-lancereader"} <= keys
    progress = [a for a in artifacts if a.type == "progress"]
    assert progress and float(progress[-1].data) == 100.0
    return {"flow_run_id": flow_run_id, "task_runs": len(task_runs), "rows": expected}


def test_deploy_and_run_end_to_end_sqlite(stack, tmp_path):
    _end_to_end(stack, tmp_path)


def test_deploy_and_run_end_to_end_postgres(pg_stack, tmp_path):
    _end_to_end(pg_stack, tmp_path)


def test_setup_activates_the_shipped_schedules_by_flag(stack):
    with stack.client() as client:
        shipped = client.read_deployment_by_name("kaiyuan-pipeline/read-write").schedules
    assert {s.slug for s in shipped} == {"nightly", "every-6h"} and not any(s.active for s in shipped)
    stack.cli(PY, "-m", "deployments.setup", "--no-deploy", "--no-generate", "--activate-schedules")
    with stack.client() as client:
        assert all(s.active for s in client.read_deployment_by_name("kaiyuan-pipeline/read-write").schedules)
    stack.cli(PY, "-m", "deployments.setup", "--no-deploy", "--no-generate", "--deactivate-schedules")
    with stack.client() as client:
        assert not any(s.active for s in client.read_deployment_by_name("kaiyuan-pipeline/read-write").schedules)


def test_scheduled_deployment_runs_without_a_trigger(stack):
    """An active interval schedule (anchored 10 s from now: the scheduler loop
    runs every 2 s here) makes the server's scheduler create a flow run,
    which the worker runs to completion."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with stack.client() as client:
        dep = client.read_deployment_by_name("kaiyuan-pipeline/vis")
        anchor = datetime.now(timezone.utc) + timedelta(seconds=10)
        (schedule,) = client.create_deployment_schedules(
            dep.id, [(IntervalSchedule(interval=timedelta(hours=1), anchor_date=anchor), True)]
        )
        try:
            deadline = time.time() + 90
            runs = []
            while time.time() < deadline and not runs:
                runs = [
                    r
                    for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                    if r.auto_scheduled
                ]
                time.sleep(2)
            assert runs, "the scheduler created no flow run"
            # (deleting the schedule earlier would delete its not-yet-started run)
            run = stack.wait_final(runs[0].id)
        finally:
            client.delete_deployment_schedule(dep.id, schedule.id)
    assert run.state.type.value == "COMPLETED"
    assert run.auto_scheduled


def test_secret_never_leaks_and_failed_node_completes_on_retry(stack, tmp_path):
    """One run that uses a LanceStorage block holding a secret (run-level and
    node-level storage options) and whose writer fails on its first attempt
    (retries from the YAML's prefect: section). The run completes; the secret
    is in no log line, parameter, task run or artifact; the block's API and UI
    payload show it obfuscated."""
    secret = f"kaiyuan-secret-{uuid.uuid4().hex}"
    key_id = f"kaiyuan-keyid-{uuid.uuid4().hex[:8]}"
    stack.cli(
        PY, "-m", "deployments.setup", "--no-deploy", "--no-generate", "--no-k8s-pool", "--storage-block", "leak-test",
        env={"AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": key_id, "AWS_REGION": "us-east-1"},
    )
    marker = tmp_path / "fault-marker"
    out = tmp_path / "secret.lance"
    params = {
        "overrides": {
            "ray.storage_options": {"block": "leak-test"},
            "pipeline.output_path": str(out),
            "pipeline.storage_options": {"block": "leak-test"},
            "prefect": {"retries": 2, "retry_delay_seconds": 0},
        }
    }
    flow_run_id = stack.run_deployment(
        "kaiyuan-pipeline/read-write", params, job_env={"KAIYUAN_FAULT_INJECT": f"LanceWriter:fail-once:{marker}"}
    )
    run = stack.wait_final(flow_run_id)
    assert run.state.type.value == "COMPLETED", (stack.home / "worker.log").read_text()[-6000:]
    assert marker.exists()  # the fault did fire
    with stack.client() as client:
        task_runs = _task_runs(client, flow_run_id)
        writer = next(t for t in task_runs if t.name.endswith("LanceWriter"))
        assert writer.run_count == 2 and writer.state.type.value == "COMPLETED"
        logs = _logs(client, flow_run_id)
        assert any("injected fault" in log.message for log in logs)
        artifacts = _artifacts(client, flow_run_id)
        block_doc = client.read_block_document_by_name("leak-test", "kaiyuan-lance-storage", include_secrets=False)
    haystacks = {
        "flow run": run.model_dump_json(),
        "parameters": json.dumps(run.parameters),
        "task runs": "".join(t.model_dump_json() for t in task_runs),
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "".join(a.model_dump_json() for a in artifacts),
        "block (API/UI)": block_doc.model_dump_json(),
        "worker output": (stack.home / "worker.log").read_text(),
    }
    assert len(logs) > 5
    # the node artifacts list each node's parameters, storage options included
    assert {"node-0-lancereader", "node-lancewriter", "run-summary"} <= {a.key for a in artifacts}
    for where, text in haystacks.items():
        assert secret not in text, f"secret leaked into {where}"
        assert key_id not in text, f"access key id leaked into {where}"
    assert read_lance(out).num_rows > 0


# ---------------------------------------------------------------------------
# Checkpoints and resume


def _resume_config(tmp_path: Path, name: str, sample: Path, alias: str = "doc", phase: int = 1) -> Path:
    cfg = {
        "ray": {"app_name": f"resume-{name}"},
        "prefect": {"checkpoint_dir": str(tmp_path / f"ckpt-{name}")},
        "pipeline": {
            "type": "LanceWriter",
            "output_path": str(tmp_path / f"out-{name}.lance"),
            "child_configs": [
                {
                    "type": "AddConstants",
                    "constant_list": [phase],
                    "column_list": ["phase"],
                    "child_configs": [
                        {
                            "type": "ColumnAlias",
                            "input_col": "text",
                            "output_col": alias,
                            "child_configs": [
                                {
                                    "type": "Filter",
                                    "column": "fasttext_score",
                                    "threshold": 0.3,
                                    "checkpoint": True,
                                    "child_configs": [
                                        {
                                            "type": "LanceReader",
                                            "input_path": str(sample / "pcmind_kaiyuan_2b_sample.lance"),
                                            "select_cols": ["id", "text", "fasttext_score"],
                                        }
                                    ],
                                }
                            ],
                        }
                    ],
                }
            ],
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _table_digest(path: Path) -> str:
    import pyarrow as pa

    table = read_lance(path)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _ran(result: dict) -> dict[str, tuple[str, float]]:
    return {n["type"]: (n["status"], n["task_seconds"]) for n in result["nodes"]}


def test_killed_run_resumes_from_its_checkpoint(run_pipeline, ray_session, sample_dir, tmp_path):
    """Uninterrupted run vs. a run killed (SIGKILL, whole process tree) after its
    first checkpoint and re-run: the re-run recomputes only the unfinished
    nodes and writes the same bytes. Then one node's parameter changes:
    that node and those above it recompute, the checkpoint below is reused."""
    reference = _resume_config(tmp_path, "reference", sample_dir)
    first = run_pipeline(reference)
    assert _ran(first)["Filter"][0] == "ran (checkpoint saved)"

    resumed_cfg = _resume_config(tmp_path, "resumed", sample_dir)
    hang = tmp_path / "hang-marker"
    # The run to kill: the same config (same node keys) plus the fault in the
    # job's runtime env. It is a separate driver process, joined to this
    # session's Ray and Prefect API; SIGKILL takes the driver, Ray then ends
    # the job's workers.
    killed_cfg = yaml.safe_load(resumed_cfg.read_text())
    killed_cfg["ray"]["runtime_env"] = {"env_vars": {"KAIYUAN_FAULT_INJECT": f"ColumnAlias:hang:{hang}"}}
    killed_path = tmp_path / "resumed-killed.yaml"
    killed_path.write_text(yaml.safe_dump(killed_cfg, sort_keys=False))
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    log = open(tmp_path / "killed-run.log", "w")
    proc = subprocess.Popen(
        [PY, "flows/run.py", "--config", str(killed_path), "--show-rows", "0",
         "--ray-address", ray_session.get_runtime_context().gcs_address],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env=_base_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "phome")),
    )
    ckpt = tmp_path / "ckpt-resumed"
    try:
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline and not hang.exists():
            assert proc.poll() is None, (tmp_path / "killed-run.log").read_text()[-4000:]
            time.sleep(1)
        assert hang.exists(), "the run never reached the node after the checkpoint"
        assert [p.name for p in ckpt.glob("Filter-*.json")], "no checkpoint before the kill"
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out-resumed.lance").exists()
    assert not list(ckpt.glob("LanceWriter-*.json"))

    resumed = run_pipeline(resumed_cfg)
    ran = _ran(resumed)
    print("\nresumed run (node: status, task seconds):")
    for n in resumed["nodes"]:
        print(f"  {n['node']}: {n['status']}, {n['task_seconds']}s")
    assert ran["Filter"][0] == "checkpoint reused"
    assert ran["LanceReader"][0] == "skipped (checkpoint reused above)"
    assert ran["ColumnAlias"][0] == "ran" and ran["AddConstants"][0] == "ran"
    assert ran["LanceWriter"][0] == "ran (checkpoint saved)"
    assert _table_digest(tmp_path / "out-resumed.lance") == _table_digest(tmp_path / "out-reference.lance")
    assert resumed["num_rows"] == first["num_rows"]

    # unchanged config, re-run: everything comes from the writer's checkpoint
    again = _ran(run_pipeline(resumed_cfg))
    assert again["LanceWriter"][0] == "checkpoint reused"
    assert all(again[t][0] == "skipped (checkpoint reused above)" for t in ("AddConstants", "ColumnAlias", "Filter", "LanceReader"))

    # change AddConstants: it and everything above recompute; Filter's checkpoint stays
    # (same schema: LanceWriter's overwrite of a dataset with another schema is a separate issue)
    changed = _resume_config(tmp_path, "resumed", sample_dir, phase=2)
    after = _ran(run_pipeline(changed))
    assert after["Filter"][0] == "checkpoint reused"
    assert after["AddConstants"][0] == "ran"
    assert after["LanceWriter"][0] == "ran (checkpoint saved)"
    assert set(read_lance(tmp_path / "out-resumed.lance").column("phase").to_pylist()) == {2}


# ---------------------------------------------------------------------------
# The UI


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_ui_shows_the_flow_run_its_task_runs_and_summary(stack, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium (.ci/run installs it)")
    with stack.client() as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType

        done = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])))
        )
    if not done:
        flow_run_id = stack.run_deployment("kaiyuan-pipeline/read-write")
        run = stack.wait_final(flow_run_id)
    else:
        run = done[0]
    with stack.client() as client:
        task_names = [t.name for t in _task_runs(client, run.id)]
    with stack.client() as client:
        artifacts = _artifacts(client, run.id)
    summary = next(a for a in artifacts if a.key == "run-summary")
    progress = [a for a in artifacts if a.type == "progress"]
    from tests.cdp_browser import Browser

    base = stack.url[: -len("/api")]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser_ = Browser(browser, tmp_path / "chrome-profile")
    try:
        browser_.goto(f"{base}/runs/flow-run/{run.id}")
        browser_.wait_for([run.name, "Completed"])
        browser_.click("task-runs")
        text = browser_.wait_for([f"{len(task_names)} Task runs", *task_names])
        browser_.screenshot(ARTIFACTS / "prefect-ui-flow-run-task-runs.png")
        browser_.click("artifacts")
        shown = ["run-summary", "node-lancewriter", "node-0-lancereader"]
        if progress:  # runs shorter than prefect.progress_after_s have none
            shown.append("pipeline-progress")
        text = browser_.wait_for(shown)
        browser_.screenshot(ARTIFACTS / "prefect-ui-flow-run-artifacts.png")
        browser_.goto(f"{base}/artifacts/artifact/{summary.id}")
        text = browser_.wait_for(["Run summary", "LanceWriter: rows in"])
        browser_.screenshot(ARTIFACTS / "prefect-ui-run-summary.png")
    finally:
        browser_.close()
    for name in ("flow-run-task-runs", "flow-run-artifacts", "run-summary"):
        shot = ARTIFACTS / f"prefect-ui-{name}.png"
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
