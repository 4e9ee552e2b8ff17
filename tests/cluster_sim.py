"""A Kubernetes-like Ray cluster on one machine, faithful to pods in what
they share: nothing but the object store.

Every "pod" (the Ray head, each Ray worker node, each flow run) is a process
tree started with ``unshare``: its own mount namespace in which the whole
root filesystem (the checkout, the venv, /var/tmp, ...) is read-only, /tmp
and /dev/shm are private tmpfs, ``$HOME`` is /tmp/home, and its own PID
namespace (so ``ray stop`` in one pod stops only that pod's Ray, as in
k8s/image/entrypoint.sh). Each pod has its own loopback address
(127.0.0.10, .11, ...) as its pod IP. What a pod writes outside the object
store is therefore lost with it and invisible to the others; a write outside
/tmp fails at once (``Read-only file system``).

Started here, all real:
- SeaweedFS (S3 API), outside any pod, with generated credentials; the
  sample data uploaded to ``s3://kaiyuan-ray/sample/`` by
  ``python -m deployments.upload`` (what ``make k8s-prepare`` runs);
- a Ray head pod with 0 CPUs (KubeRay's usual head) and ``workers`` worker
  pods with ``cpus_per_worker`` CPUs each, token authentication on;
- a Prefect server (outside the pods, like its own Deployment).
A flow run is a pod running ``k8s/image/entrypoint.sh``: it joins the Ray
cluster as a zero-CPU node and runs the command with ``RAY_ADDRESS=auto``,
as a flow-run pod of the ``kaiyuan`` work pool does.

Needs root (``unshare``); Linux only. Used by tests/test_cluster_sim.py and by
``make cluster-sim`` (``python -m tests.cluster_sim up``), which keeps one up
and prints how to run a recipe on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import Service, free_port, session_alive
from tests.s3_server import S3, make_bucket, s3_server, tool

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "kaiyuan-ray"  # flows.k8s_paths.DEFAULT_BUCKET: the YAMLs' data/... paths land here
HEAD_IP = "127.0.0.10"

# `ray start` gives a new node a hard-coded 30 s to register with the GCS,
# which an overloaded 2-core machine can miss: the same CLI with that
# module's clock slowed 4x (a 120 s window); nothing else changes.
PATIENT_RAY_START = (
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


def can_simulate() -> str | None:
    """Why the simulation cannot run here, or None."""
    if sys.platform != "linux":
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (unshare -m)"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    return None


POD = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
       "bash", str(ROOT / "tests" / "sim_pod.sh")]


def pod_command(ip: str, argv: list[str], volume: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """``argv`` wrapped to run as a pod with pod IP ``ip``; plus the env it needs."""
    env = {"POD_IP": ip, "KAIYUAN_POD_CWD": str(ROOT)}
    if volume is not None:
        volume.mkdir(parents=True, exist_ok=True)
        env["KAIYUAN_POD_VOLUME"] = str(volume)
    return [*POD, *argv], env


@dataclass
class ClusterSim:
    workdir: Path
    workers: int = 2
    cpus_per_worker: int = 1
    s3: S3 | None = None
    ray_address: str = ""
    prefect_url: str = ""
    services: dict[str, Service] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _next_ip: int = 20
    _runs: int = 0

    # ---------------------------------------------------------------- start
    def start(self, *, prefect_db: Path | None = None) -> "ClusterSim":
        """Start everything; ``prefect_db``: a migrated Prefect database to
        start the server on (a copy), saving the migrations."""
        reason = can_simulate()
        if reason:
            raise RuntimeError(f"cluster simulation unavailable: {reason}")
        try:
            self.s3 = self._stack.enter_context(s3_server(self.workdir))
            make_bucket(self.s3, BUCKET)
            self._start_ray()
            self._start_prefect(prefect_db)
        except BaseException:
            self.stop()
            raise
        return self

    def _ray_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "RAY_", "LANCE_"))}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   PYTHONPATH=str(ROOT))
        env.update(self.s3.env(BUCKET))
        return env

    def _start_ray_node(self, name: str, ip: str, args: list[str], volume: Path | None = None) -> None:
        ports = [
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        ]
        argv = [sys.executable, "-c", PATIENT_RAY_START, "start", f"--node-ip-address={ip}", "--num-gpus=0",
                "--object-store-memory=150000000", "--disable-usage-stats", "--block", *ports, *args]
        wrapped, pod_env = pod_command(ip, argv, volume)
        if volume is not None:  # compiled kernels on the pod's volume, as in the image
            pod_env["KAIYUAN_KERNEL_CACHE"] = "/tmp/volume/kernels"
        service = Service(name, wrapped, {**self._ray_env(), **pod_env}, self.workdir)
        self.services[name] = service
        service.wait_for(lambda: "Ray runtime started" in service.log_text(), f"{name} start", timeout=300)

    def _start_ray(self) -> None:
        port = free_port()
        self.ray_address = f"{HEAD_IP}:{port}"
        self._start_ray_node("ray-head", HEAD_IP, ["--head", f"--port={port}", "--num-cpus=0",
                                                   "--include-dashboard=false", f"--ray-client-server-port={free_port()}"])
        for i in range(self.workers):
            self.start_worker(i)

    def start_worker(self, i: int) -> None:
        name = f"ray-worker-{i}"
        self._start_ray_node(name, f"127.0.0.{11 + i}", [f"--address={self.ray_address}", f"--num-cpus={self.cpus_per_worker}"],
                             volume=self.volume(name))

    def volume(self, pod: str) -> Path:
        """The host directory mounted at /tmp/volume in a worker pod."""
        return self.workdir / "volumes" / pod

    def _start_prefect(self, prefect_db: Path | None) -> None:
        port = free_port()
        home = self.workdir / "prefect-home"
        home.mkdir(parents=True, exist_ok=True)
        if prefect_db is not None:
            shutil.copyfile(prefect_db, home / "prefect.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
                   DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="WARNING")
        server = Service("prefect-server", [tool("prefect"), "server", "start", "--host", "127.0.0.1",
                                            "--port", str(port)], env, self.workdir)
        self.services["prefect-server"] = server
        self.prefect_url = f"http://127.0.0.1:{port}/api"

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.prefect_url}/health", timeout=5) as r:
                return r.status == 200

        server.wait_for(healthy, "Prefect API health", timeout=240)

    # ---------------------------------------------------------------- use
    def flow_env(self, **extra: str) -> dict[str, str]:
        """What a flow-run pod of the k8s work pool gets (k8s/base-job-template.json)."""
        env = self._ray_env()
        env.update(
            KAIYUAN_RAY_JOIN="1", KAIYUAN_RAY_HEAD=self.ray_address, RAY_ADDRESS="auto",
            PREFECT_API_URL=self.prefect_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
            KAIYUAN_RAY_OBJECT_STORE_BYTES="150000000",
        )
        env.update(extra)
        return env

    def pod_ip(self) -> str:
        self._next_ip += 1
        return f"127.0.0.{self._next_ip}"

    def pod_prefix(self) -> list[str]:
        """The command prefix that starts a pod (its IP chosen inside)."""
        return list(POD)

    def flow_pod(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
        """``argv`` as a flow-run pod: joins Ray as a zero-CPU node first."""
        wrapped, pod_env = pod_command(self.pod_ip(), [str(ROOT / "k8s/image/entrypoint.sh"), *argv])
        return wrapped, {**(env or self.flow_env()), **pod_env}

    def start_flow(self, argv: list[str], **extra: str) -> Service:
        """``argv`` as a flow-run pod in the background (output in its log)."""
        wrapped, env = self.flow_pod(argv, self.flow_env(**extra))
        self._runs += 1
        return Service(f"flow-run-{self._runs}", wrapped, env, self.workdir, cwd=ROOT)

    def run_flow(self, argv: list[str], timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
        """``argv`` as a flow-run pod, to the end; stdout holds its output
        (stderr merged). The pod is stopped whatever happens: killing only
        ``unshare`` would leave the processes of its PID namespace behind."""
        pod = self.start_flow(argv, **extra)
        try:
            rc = pod.proc.wait(timeout)
        finally:
            pod.stop(grace=5)
        return subprocess.CompletedProcess(pod.proc.args, rc, pod.log_text(), "")

    def upload_sample(self, sample_root: Path) -> None:
        """``sample_root``/data/sample -> s3://BUCKET/sample (the upload helper)."""
        out = subprocess.run([sys.executable, "-m", "deployments.upload", "data/sample"], cwd=sample_root,
                             env={**os.environ, **self.s3.env(BUCKET), "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"upload failed:\n{out.stderr[-3000:]}")

    def node_busy(self, name: str) -> bool:
        """True while a Ray worker process of the pod runs a task or an actor
        (its process title is ``ray::<task>``; ``ray::IDLE`` when idle, and
        the node's own ``ray::DashboardAgent``/``RuntimeEnvAgent``)."""
        for pid in session_alive(self.services[name].proc.pid):
            with contextlib.suppress(OSError):
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if title.startswith("ray::") and not title.startswith("ray::IDLE") and "Agent" not in title:
                    return True
        return False

    def kill_node(self, name: str) -> None:
        """The node's pod dies: every process in it, at once."""
        self.services[name].stop(grace=0)

    # ---------------------------------------------------------------- stop
    def stop(self) -> None:
        for name in reversed(list(self.services)):
            self.services[name].stop(grace=5)
        self._stack.close()


@contextlib.contextmanager
def cluster_sim(workdir: Path | None = None, prefect_db: Path | None = None, **kwargs):
    own = workdir is None
    # Outside /tmp: the pods mount their own over it.
    workdir = workdir or Path(tempfile.mkdtemp(prefix="ksim", dir="/var/tmp"))
    try:
        sim = ClusterSim(workdir, **kwargs).start(prefect_db=prefect_db)  # stops what it started if it fails
        try:
            yield sim
        finally:
            sim.stop()
    finally:
        if own and not os.environ.get("KAIYUAN_KEEP_TEST_LOGS"):
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """up: start a simulation with the sample data uploaded, keep it up until
    Ctrl-C. run DIR -- CMD...: run CMD as a flow-run pod of the simulation
    started in DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.cluster_sim", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus-per-worker", type=int, default=1)
    up.add_argument("--rows", type=int, default=10_000, help="rows per sample dataset")
    run = sub.add_parser("run")
    run.add_argument("dir", type=Path)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "run":
        env = json.loads((args.dir / "flow-env.json").read_text())
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        wrapped, pod_env = pod_command(f"127.0.0.{100 + os.getpid() % 150}", [str(ROOT / "k8s/image/entrypoint.sh"), *argv])
        return subprocess.run(wrapped, env={**env, **pod_env}, cwd=ROOT).returncode

    import signal

    from samples.data import generate_all

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the pods too, as Ctrl-C does
    with cluster_sim(workers=args.workers, cpus_per_worker=args.cpus_per_worker) as sim:
        generate_all(str(sim.workdir / "upload" / "data" / "sample"), rows=args.rows)
        sim.upload_sample(sim.workdir / "upload")
        state = sim.workdir / "flow-env.json"  # holds credentials: owner-only
        state.touch(mode=0o600)
        state.write_text(json.dumps(sim.flow_env()))
        print(f"Ray head {sim.ray_address} (0 CPUs) + {args.workers} worker pods; Prefect API {sim.prefect_url}; "
              f"S3 {sim.s3.endpoint}, sample data in s3://{BUCKET}/sample/; logs in {sim.workdir}\n"
              f"Run a recipe as a flow-run pod:\n"
              f"  python -m tests.cluster_sim run {sim.workdir} -- python flows/run.py --config examples/dedup.yaml --mode k8s\n"
              "Ctrl-C stops everything.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def rows_digest(table) -> str:
    """A digest of a table's rows, independent of their order."""
    import hashlib

    rows = sorted(json.dumps(row, sort_keys=True, default=repr) for row in table.to_pylist())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def recipe_lines(stdout: str) -> dict[str, dict]:
    """tests/run_recipes.py's lines, by recipe name."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RECIPE "):
            item = json.loads(line[len("RECIPE "):])
            out[Path(item["config"]).stem] = item
    return out
