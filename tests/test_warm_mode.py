"""Warm mode: `python -m flows.services up` keeps a Ray head and a Prefect
server running; the CLI finds and uses both, starting neither."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
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


def test_cli_uses_the_running_ray_and_prefect_server(tmp_path, prefect_db_template):
    # Ray's socket paths must stay short: its temp dir is a short one of our own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="kw", dir="/tmp"))
    home = fresh_prefect_home(tmp_path / "services_home", prefect_db_template)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=str(ray_tmp), PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(port),
               KAIYUAN_FIND_SERVICES="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    services = [sys.executable, "-m", "flows.services"]
    try:
        up = subprocess.run([*services, "up"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        api_url = f"http://127.0.0.1:{port}/api"
        assert f"Prefect API: {api_url}" in up.stdout
        heads = list((ray_tmp / "ray").glob("session_2*"))
        assert len(heads) == 1, heads
        status = subprocess.run([*services, "status"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "not running" not in status.stdout, status.stdout

        src, out = tmp_path / "in.lance", tmp_path / "out.lance"
        lance.write_dataset(pa.table({"id": list(range(500)), "text": [f"doc {i}" for i in range(500)]}), str(src))
        config = write_config(tmp_path, {"ray": {"app_name": "warm"}, "pipeline": {
            "type": "LanceWriter", "output_path": str(out),
            "child_configs": [{"type": "LanceReader", "input_path": str(src)}]}})
        # Its own PREFECT_HOME: had the CLI started an embedded API, the run
        # would be recorded there and not in the running server.
        cli_home = tmp_path / "cli_home"
        cli_env = {**env, "PREFECT_HOME": str(cli_home)}
        run = subprocess.run([sys.executable, "flows/run.py", "--config", str(config), "--show-rows", "0"],
                             env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        assert read_lance(out).num_rows == 500
        assert "using the running Ray at" in run.stderr, run.stderr
        assert f"using the Prefect API at {api_url}" in run.stderr, run.stderr
        # No new Ray: a Ray the CLI started would have its session next to the head's.
        assert list((ray_tmp / "ray").glob("session_2*")) == heads
        runs = _flow_runs(api_url)
        assert [(r["name"].split("-")[0], r["state_type"]) for r in runs] == [("warm", "COMPLETED")]
        assert not (cli_home / "prefect.db").exists()
        # The head's processes stay up for the next run.
        assert _processes_naming(heads[0].name)
    finally:
        down = subprocess.run([*services, "down"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        left = _processes_naming(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, left
    assert not _processes_naming(f"--port {port}") and not _processes_naming(f"PREFECT_SERVER_API_PORT={port}")
