"""The k8s path on a cluster whose pods share nothing but the object store
(tests/cluster_sim.py: Ray head with 0 CPUs, two worker pods, flow-run pods,
each in its own mount and PID namespace with a read-only root; SeaweedFS;
a Prefect server and a process worker whose flow runs start as pods).

- every example in k8s mode gives the output of a local run (rows and a
  digest of the sorted rows);
- read_write, dedup and fasttext through `prefect deployment run`-style flow
  runs of a deployment, picked up by `prefect worker start`;
- MinHash (dedup, dedup_zh) among them, which wrote its signatures to the
  pod's read-only disk before the work location moved to the object store;
- compiled MinHash kernels reused, not recompiled, by a later run;
- a worker pod lost in the middle of a dedup and of a scoring run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pyarrow.fs as pafs
import pytest

from tests.cluster_sim import BUCKET, ROOT, can_simulate, cluster_sim, recipe_lines, rows_digest
from tests.processes import Service
from tests.s3_server import tool

SAMPLE_ROWS = 1000
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.yaml"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3000),
    pytest.mark.xdist_group("cluster-sim"),
    pytest.mark.skipif(can_simulate() is not None, reason=f"cluster simulation: {can_simulate()}"),
]


@pytest.fixture(scope="module")
def sim(prefect_db_template):
    from samples.data import generate_all

    with cluster_sim(prefect_db=prefect_db_template) as running:
        generate_all(str(running.workdir / "upload" / "data" / "sample"), rows=SAMPLE_ROWS, seed=0)
        running.upload_sample(running.workdir / "upload")
        yield running


@pytest.fixture(scope="module")
def local_sweep(sim):
    """Every example run locally (a plain process, local Ray and Prefect) on
    the same sample data, started in the background: it overlaps the k8s
    runs, most of whose time is waiting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_", "AWS_", "LANCE_"))}
    env.update(PREFECT_HOME=str(sim.workdir / "local-prefect"), PYTHONPATH=str(ROOT), KAIYUAN_QUIET="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    sweep = Service("local-sweep", [sys.executable, str(ROOT / "tests" / "run_recipes.py"), "local",
                                    *[str(ROOT / "examples" / f"{name}.yaml") for name in EXAMPLES]],
                    env, sim.workdir, cwd=sim.workdir / "upload")
    yield sweep
    sweep.stop(grace=5)  # with the local Ray it started


@pytest.fixture(scope="module")
def local_outputs(sim, local_sweep) -> dict[str, dict]:
    """name -> {rows, digest} of the local runs (digest None for a recipe
    whose root writes nothing)."""
    import lance

    local_sweep.proc.wait(timeout=2400)
    lines = recipe_lines(local_sweep.log_text())

    def digest(output: str | None) -> str | None:
        # Outputs are named as in the recipes: relative to the run's directory.
        return None if output is None else rows_digest(lance.dataset(str(sim.workdir / "upload" / output)).to_table())

    # A failed local run is reported by the tests that need it, with its error.
    return {name: {"rows": item["rows"], "digest": digest(item["output"])} if item["rc"] == 0
            else {"error": item.get("error", "no result")} for name, item in lines.items()}


def local(local_outputs: dict, name: str) -> dict:
    item = local_outputs.get(name, {"error": "not run"})
    assert "error" not in item, f"the local run of {name} failed: {item['error']}"
    return item


def s3_digest(sim, uri: str) -> tuple[int, str]:
    import lance

    table = lance.dataset(uri, storage_options=sim.s3.storage_options()).to_table()
    return table.num_rows, rows_digest(table)


def kernel_files(sim) -> dict[str, float]:
    """Compiled MinHash kernels on the worker pods' volumes: path -> mtime."""
    return {str(p): p.stat().st_mtime for p in (sim.workdir / "volumes").rglob("*.nbc")}


def test_every_example_in_k8s_mode_matches_the_local_run(sim, local_sweep, request):
    out = sim.run_flow(["python", "tests/run_recipes.py", "k8s", *[f"examples/{name}.yaml" for name in EXAMPLES]],
                       timeout=2400)
    ran = recipe_lines(out.stdout)
    failed = {name: item.get("error") for name, item in ran.items() if item["rc"] != 0}
    assert not failed and len(ran) == len(EXAMPLES), f"{failed}\n{out.stdout[-4000:]}"
    local_outputs = request.getfixturevalue("local_outputs")
    for name, item in ran.items():
        expected = local(local_outputs, name)
        if expected["digest"] is None:  # a report at the root (vis): rows only
            assert item["output"] is None and item["rows"] == expected["rows"], name
            continue
        assert item["output"].startswith(f"s3://{BUCKET}/output/"), item
        assert s3_digest(sim, item["output"]) == (expected["rows"], expected["digest"]), name
    # MinHash's signatures went to the run's work location in the bucket
    # (the pods' disks are read-only: a local write fails there).
    listed = sim.s3.filesystem().get_file_info(pafs.FileSelector(f"{BUCKET}/_kaiyuan/minhash", recursive=True))
    assert any(info.path.endswith("committed.json") for info in listed)
    assert kernel_files(sim), "the worker pods compiled no MinHash kernels into their cache"


def test_deployments_run_as_flow_run_pods_by_a_worker(sim, local_outputs):
    """read_write, dedup and fasttext as deployments (mode k8s) on a process
    work pool whose flow runs start as pods that join the Ray cluster
    (k8s/image/entrypoint.sh), as the kubernetes pool's Jobs do."""
    pool = f"kaiyuan-sim-{uuid.uuid4().hex[:6]}"
    names = ["read_write", "dedup", "fasttext"]
    compiled = kernel_files(sim)  # by the example sweep's MinHash runs
    command = " ".join([*sim.pod_prefix(), str(ROOT / "k8s/image/entrypoint.sh"), sys.executable, "-m", "prefect.engine"])
    script = f"""
import asyncio
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate

async def main():
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name={pool!r}, type="process"))
    ids = []
    for name in {names!r}:
        source = await flow.from_source(source={str(ROOT)!r}, entrypoint="flows/pipeline.py:kaiyuan_pipeline")
        dep_id = await source.deploy(name=name.replace("_", "-") + "-k8s", work_pool_name={pool!r},
                                     parameters={{"config": f"examples/{{name}}.yaml", "mode": "k8s", "work_dir": "runs/deployed"}},
                                     job_variables={{"command": {command!r}}}, print_next_steps=False)
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(dep_id)
        ids.append(str(run.id))
    print("RUN_IDS " + " ".join(ids))

asyncio.run(main())
"""
    env = sim.flow_env()
    made = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-4000:]
    run_ids = [line for line in made.stdout.splitlines() if line.startswith("RUN_IDS ")][-1].split()[1:]
    worker = Service("prefect-worker", [tool("prefect"), "worker", "start", "--pool", pool, "--limit", "1"],
                     env, sim.workdir, cwd=ROOT)
    states: dict[str, str] = {}

    def finished() -> bool:
        for run_id in run_ids:
            with urllib.request.urlopen(f"{sim.prefect_url}/flow_runs/{run_id}", timeout=10) as response:
                states[run_id] = ((json.loads(response.read()).get("state") or {}).get("type")) or "NONE"
        return all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values())

    try:
        worker.wait_for(finished, "three finished flow runs", timeout=1500)
    finally:
        worker.stop(grace=5)
    log = worker.log_text()
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{log[-6000:]}"
    assert sim.s3.secret not in log
    for name in names:
        expected = local(local_outputs, name)
        assert s3_digest(sim, f"s3://{BUCKET}/output/{name}.lance") == (expected["rows"], expected["digest"]), name
    # The deployment's work_dir parameter placed MinHash's signatures (in the bucket: relative, k8s mode).
    listed = sim.s3.filesystem().get_file_info(pafs.FileSelector(f"{BUCKET}/runs/deployed/minhash", recursive=True))
    assert any(info.path.endswith("committed.json") for info in listed)
    # The kernels are in the worker pods' caches; those an earlier run (the
    # example sweep) compiled were loaded by this dedup, not rewritten.
    assert kernel_files(sim)
    assert {p: m for p, m in kernel_files(sim).items() if p in compiled} == compiled


@pytest.mark.parametrize("recipe", ["dedup", "fasttext"])
def test_losing_a_worker_pod_mid_run(sim, local_outputs, recipe):
    """A worker pod dies while the recipe runs (every process in it killed at
    once, as when a node goes away). Ray retries the lost tasks and rebuilds
    lost blocks on the surviving pod; the run completes with the same output."""
    started = time.monotonic()
    pod = sim.start_flow(["python", "flows/run.py", "--config", f"examples/{recipe}.yaml", "--mode", "k8s", "--show-rows", "0"])
    workers = [f"ray-worker-{i}" for i in range(sim.workers)]
    victim = None
    try:
        deadline = time.monotonic() + 600
        # Kill the first worker pod that runs some of the recipe's work.
        while victim is None and pod.proc.poll() is None and time.monotonic() < deadline:
            victim = next((name for name in workers if sim.node_busy(name)), None)
            time.sleep(0.2)
        killed_at = time.monotonic() - started
        mid_run = victim is not None and pod.proc.poll() is None
        if victim is not None:
            sim.kill_node(victim)
        rc = pod.proc.wait(timeout=900)
    finally:
        pod.stop(grace=5)
        if victim is not None:
            sim.start_worker(workers.index(victim))  # the next test gets every worker again
    text = pod.log_text()
    print(f"{recipe}: {victim} killed at {killed_at:.1f} s; run took {time.monotonic() - started:.1f} s")
    assert mid_run, f"the run ended before any of its work reached a worker pod:\n{text[-3000:]}"
    assert rc == 0, text[-6000:]
    target = {"dedup": "dedup", "fasttext": "fasttext"}[recipe]
    expected = local(local_outputs, recipe)
    assert s3_digest(sim, f"s3://{BUCKET}/output/{target}.lance") == (expected["rows"], expected["digest"])


def test_upload_helper_round_trip(sim):
    import lance

    local = lance.dataset(str(sim.workdir / "upload/data/sample/pcmind_kaiyuan_2b_sample.lance")).to_table()
    remote = lance.dataset(f"s3://{BUCKET}/sample/pcmind_kaiyuan_2b_sample.lance", storage_options=sim.s3.storage_options()).to_table()
    assert remote.num_rows == SAMPLE_ROWS and remote.equals(local)
    bad = {**sim.s3.storage_options(), "aws_secret_access_key": "wrong"}
    with pytest.raises(Exception):
        lance.dataset(f"s3://{BUCKET}/sample/pcmind_kaiyuan_2b_sample.lance", storage_options=bad).count_rows()
