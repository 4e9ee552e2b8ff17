"""Warm mode: `python -m flows.services up` keeps a Ray head, a Prefect
server and the warm runner running; the CLI hands its run to the runner, or
finds and uses the Ray head and the server, starting neither."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from tests.conftest import ROOT, fresh_prefect_home, read_lance, write_config
from tests.processes import free_port

pytestmark = pytest.mark.timeout(900)


def _processes_naming(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _run_cli(args: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "flows" / "run.py"), *args, "--show-rows", "0"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _runner_pid(output: str) -> int:
    (line,) = [line for line in output.splitlines() if line.startswith("using the warm runner (pid ")]
    return int(line.split("pid ")[1].rstrip(")"))


def _ping(socket_path: Path) -> dict | None:
    import socket

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5)
        conn.connect(str(socket_path))
        conn.sendall(b'{"ping": true}\n')
        line = conn.makefile("r").readline()
        return json.loads(line) if line else None
    except OSError:
        return None
    finally:
        conn.close()


def test_cli_uses_the_running_ray_prefect_server_and_warm_runner(tmp_path, prefect_db_template):
    # Ray's socket paths must stay short: its temp dir is a short one of our own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="kw", dir="/tmp"))
    home = fresh_prefect_home(tmp_path / "services_home", prefect_db_template)
    port = free_port()
    hang_marker = tmp_path / "hanging"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "RAY_ADDRESS"))}
    # The runner's workers have the environment of `up`: a Filter node hangs there (the interrupt below).
    env.update(RAY_TMPDIR=str(ray_tmp), PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(port),
               KAIYUAN_RAY_PORT=str(free_port()), KAIYUAN_FIND_SERVICES="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               KAIYUAN_FAULT_INJECT=f"Filter:hang:{hang_marker}")
    services = [sys.executable, "-m", "flows.services"]
    socket_path = ray_tmp / "ray" / "kaiyuan-runner.sock"
    try:
        up = subprocess.run([*services, "up"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        api_url = f"http://127.0.0.1:{port}/api"
        assert f"Prefect API: {api_url}" in up.stdout
        heads = list((ray_tmp / "ray").glob("session_2*"))
        assert len(heads) == 1, heads
        first = _ping(socket_path)
        runner_pid = first["pid"]
        assert f"warm runner: pid {runner_pid}" in up.stdout
        status = subprocess.run([*services, "status"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "not running" not in status.stdout, status.stdout

        src = tmp_path / "in.lance"
        lance.write_dataset(pa.table({"id": list(range(500)), "text": [f"doc {i}" for i in range(500)]}), str(src))

        def recipe(name: str, out: str, filtered: bool = False) -> Path:
            reader = {"type": "LanceReader", "input_path": "in.lance"}  # relative: to the CLI's directory
            child = {"type": "Filter", "column": "id", "comparison": ">=", "threshold": 0, "child_configs": [reader]} if filtered else reader
            return write_config(tmp_path, {"ray": {"app_name": name}, "pipeline": {
                "type": "LanceWriter", "output_path": out, "child_configs": [child]}}, name=f"{name}.yaml")

        # 1. Another PREFECT_HOME than the runner's: the CLI says why it runs
        # the recipe itself, as its own driver on the running Ray and server.
        # Had it started an embedded API, the run would be recorded in its
        # own home and not in the running server.
        cli_home = tmp_path / "cli_home"
        run = _run_cli(["--config", str(recipe("attached", "attached.lance"))], {**env, "PREFECT_HOME": str(cli_home)},
                       tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "warm runner: started with other settings of PREFECT_HOME; running here" in run.stderr, run.stderr
        assert "using the running Ray at" in run.stderr, run.stderr
        assert f"using the Prefect API at {api_url}" in run.stderr, run.stderr
        assert read_lance(tmp_path / "attached.lance").num_rows == 500
        assert not (cli_home / "prefect.db").exists()

        # 2. The same settings: the warm runner runs it, in the CLI's
        # directory, and its output and exit code are the CLI's.
        for name in ("served", "served_again"):
            run = _run_cli(["--config", str(recipe(name, f"{name}.lance"))], env, tmp_path)
            assert run.returncode == 0, run.stdout + run.stderr
            assert _runner_pid(run.stderr) == runner_pid
            assert "rows: 500" in run.stdout and read_lance(tmp_path / f"{name}.lance").num_rows == 500
        bad = write_config(tmp_path, {"pipeline": {"type": "LanceWritter", "output_path": "x.lance"}}, name="bad.yaml")
        run = _run_cli(["--config", str(bad)], env, tmp_path)
        assert run.returncode == 2, run.stdout + run.stderr
        assert "LanceWritter" in run.stderr and "Traceback" not in run.stderr, run.stderr

        # 3. Ctrl-C reaches the run: the CLI exits 130, the hanging node
        # task's worker is stopped, and the runner serves the next run.
        cli = subprocess.Popen([sys.executable, str(ROOT / "flows" / "run.py"), "--config",
                                str(recipe("interrupted", "interrupted.lance", filtered=True))],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # Ctrl-C as in a terminal, even if this test runs with SIGINT ignored.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not hang_marker.exists() and time.monotonic() < deadline and cli.poll() is None:
            time.sleep(0.2)
        assert hang_marker.exists(), cli.communicate()
        time.sleep(0.5)
        hanging_worker = int(hang_marker.read_text())
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 130, out + err
        assert _runner_pid(err) == runner_pid
        deadline = time.monotonic() + 60
        while Path(f"/proc/{hanging_worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{hanging_worker}").exists(), "the interrupted run's node task is still running"
        assert not (tmp_path / "interrupted.lance").exists()
        run = _run_cli(["--config", str(recipe("after_interrupt", "after_interrupt.lance"))], env, tmp_path)
        assert run.returncode == 0 and _runner_pid(run.stderr) == runner_pid, run.stdout + run.stderr

        # No new Ray: a Ray the CLI started would have its session next to the head's.
        assert list((ray_tmp / "ray").glob("session_2*")) == heads
        states = {r["name"].split("-")[0]: r["state_type"] for r in _flow_runs(api_url)}
        assert {k: states.get(k) for k in ("attached", "served", "served_again", "after_interrupt")} == dict.fromkeys(
            ("attached", "served", "served_again", "after_interrupt"), "COMPLETED"), states
        assert states.get("interrupted") != "COMPLETED", states

        # 4. A CLI on other code (its fingerprint differs): the runner says
        # so, the CLI runs the recipe itself, and the runner restarts on the
        # current code.
        conn_env = {**env}
        request = {"argv": ["--config", "x.yaml"], "cwd": str(tmp_path), "env": conn_env, "fingerprint": "other code"}
        import socket

        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(socket_path))
        conn.sendall((json.dumps(request) + "\n").encode())
        answer = json.loads(conn.makefile("r").readline())
        conn.close()
        assert "older code" in answer["decline"], answer
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ((now := _ping(socket_path)) and now["since"] != first["since"]):
            time.sleep(0.5)
        assert now and now["since"] != first["since"] and now["pid"] == runner_pid  # re-executed in place
        run = _run_cli(["--config", str(recipe("after_restart", "after_restart.lance"))], env, tmp_path)
        assert run.returncode == 0 and _runner_pid(run.stderr) == runner_pid, run.stdout + run.stderr
        # The head's processes stay up for the next run.
        assert _processes_naming(heads[0].name)
    finally:
        down = subprocess.run([*services, "down"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        left = _processes_naming(str(ray_tmp)) + _processes_naming("flows.warm serve")
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, left
    assert not _processes_naming(f"--port {port}") and not _processes_naming(f"PREFECT_SERVER_API_PORT={port}")
