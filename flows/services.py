"""Keep a local Ray and a Prefect server up between runs (warm mode).

    python -m flows.services up       # prefect server start --background; ray start --head; the warm runner
    python -m flows.services status
    python -m flows.services down     # stops all three

KAIYUAN_RAY_PORT sets the head's port (Ray's default: 6379).

While they are up, `python flows/run.py --config X.yaml` hands the run to the
warm runner (flows/warm.py: one long-lived driver whose Ray workers stay
warm between runs), or, when the runner cannot take it, finds and uses the
Ray head (Ray's record of it in /tmp/ray) and the Prefect server
(PREFECT_SERVER_API_HOST:PORT, 127.0.0.1:4200 by default) itself: a run
starts neither, and its history is in that server's UI.
``KAIYUAN_FIND_SERVICES=0`` makes a run start its own anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from flows import runtime, warm  # noqa: E402  (telemetry off before Prefect and Ray load)

START_TIMEOUT_S = 180


def _tool(name: str) -> str:
    """The venv's own `prefect` / `ray` command, next to this interpreter."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _wait(found, what: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"error: {what} did not answer within {START_TIMEOUT_S} s")


def up() -> int:
    os.environ["KAIYUAN_FIND_SERVICES"] = "1"
    url = runtime.running_local_prefect()
    if url is None:
        subprocess.run([_tool("prefect"), "server", "start", "--background"], check=True, stdout=subprocess.DEVNULL)
        url = _wait(runtime.running_local_prefect, "prefect server start")
    print(f"Prefect API: {url}")
    address = runtime.running_local_ray()
    if address is None:
        cpus = os.cpu_count() or 1
        # As a Ray the CLI starts itself: idle workers beyond one per CPU
        # are kept, so node tasks and Ray Data tasks never wait for a worker.
        system = {"num_workers_soft_limit": cpus + runtime.WORKERS_ABOVE_CPUS}
        port = ["--port", os.environ["KAIYUAN_RAY_PORT"]] if os.environ.get("KAIYUAN_RAY_PORT") else []
        subprocess.run([_tool("ray"), "start", "--head", "--disable-usage-stats", "--include-dashboard=false",
                        f"--system-config={json.dumps(system)}", *port], check=True, stdout=subprocess.DEVNULL)
        address = _wait(runtime.running_local_ray, "ray start --head")
    print(f"Ray: {address}")
    print(f"warm runner: pid {start_runner()}")
    return 0


def start_runner() -> int:
    """Start the warm runner (unless one answers); returns its pid. Its
    output goes to a log next to its socket."""
    answer = warm.ping()
    if answer is None:
        log = warm.socket_path().with_suffix(".log")
        with open(log, "ab") as out:
            subprocess.Popen([sys.executable, "-m", "flows.warm", "serve"], cwd=_ROOT, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        answer = _wait(warm.ping, f"the warm runner (log: {log})")
    return answer["pid"]


def stop_runner(grace_s: float = 30.0) -> bool:
    """SIGTERM to the warm runner (a run it serves is interrupted); True if one was running."""
    import signal

    answer = warm.ping()
    if answer is None:
        return False
    pid = answer["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    warm.socket_path().unlink(missing_ok=True)
    return True


def status() -> int:
    os.environ["KAIYUAN_FIND_SERVICES"] = "1"
    url, address, runner = runtime.running_local_prefect(), runtime.running_local_ray(), warm.ping()
    print(f"Prefect API: {url or 'not running'}")
    print(f"Ray: {address or 'not running'}")
    print(f"warm runner: {'pid %d' % runner['pid'] if runner else 'not running'}")
    return 0 if url and address and runner else 1


def down() -> int:
    stop_runner()
    subprocess.run([_tool("prefect"), "server", "stop"], check=False, stdout=subprocess.DEVNULL)
    stopped = stop_ray_head()
    print(f"stopped the Prefect server and {stopped} Ray processes")
    return 0


def stop_ray_head(grace_s: float = 10.0) -> int:
    """Stop the processes of the Ray head `up` started (its session, found
    in Ray's temp dir), not every Ray on the machine as `ray stop` would.
    Returns how many processes were signalled."""
    import signal

    import ray  # noqa: F401  (first: ray's private modules do not import on their own)
    from ray._common.utils import get_default_ray_temp_dir

    temp = Path(get_default_ray_temp_dir())
    session = (temp / "session_latest").resolve().name
    if not session.startswith("session_"):
        return 0
    me = os.getpid()

    def members() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != me:
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if session.encode() in cmdline:
                    pids.append(int(entry.name))
        return pids

    pids = members()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)
    (temp / "ray_current_cluster").unlink(missing_ok=True)
    return len(pids)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "status", "down"))
    action = parser.parse_args(argv).action
    return {"up": up, "status": status, "down": down}[action]()


if __name__ == "__main__":
    sys.exit(main())
