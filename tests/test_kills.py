"""Kills and SIGTERM during an overwrite, through the real CLI as a user (or
Kubernetes) would: the previous version stays readable, the flow run ends in
a terminal state that matches the data, files of interrupted writes are
removed by the next run, and a rerun succeeds."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import ROOT, fresh_prefect_home

pytestmark = pytest.mark.slow

ROWS = int(os.environ.get("KAIYUAN_KILL_TEST_ROWS", "300000"))  # the 1M: KAIYUAN_KILL_TEST_ROWS=1000000


@pytest.fixture
def setup(tmp_path, prefect_db_template):
    src, out = tmp_path / "src.lance", tmp_path / "out.lance"
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"])
    text = [" ".join(rng.choice(words, 30)) for _ in range(2000)] * (ROWS // 2000)
    lance.write_dataset(pa.table({"id": np.arange(ROWS), "text": text}), str(src), max_rows_per_file=ROWS // 8)
    lance.write_dataset(pa.table({"id": np.arange(10), "text": ["previous"] * 10}), str(out))
    cfg = tmp_path / "overwrite.yaml"
    cfg.write_text(
        f"pipeline:\n  type: LanceWriter\n  output_path: {out}\n  num_output_files: 24\n  child_configs:\n"
        f"    - type: Filter\n      column: id\n      comparison: '>='\n      threshold: 0\n      child_configs:\n"
        f"        - type: LanceReader\n          input_path: {src}\n          num_parallel: 24\n"
    )
    home = fresh_prefect_home(tmp_path / "prefect-home", prefect_db_template)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", KAIYUAN_NUM_CPUS="2")
    return cfg, out, home, env


def start(cfg: Path, env: dict, **extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "flows" / "run.py"), "--config", str(cfg), "--show-rows", "0"],
        env={**env, **extra}, cwd=cfg.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_until(proc: subprocess.Popen, check, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.stdout.read().decode()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and everything it started (its Ray, its Prefect API), as when a pod dies."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def data_files(out: Path) -> set[str]:
    return set(os.listdir(out / "data"))


def flow_run_states(home: Path) -> list[str]:
    with sqlite3.connect(home / "prefect.db") as db:
        return [row[0] for row in db.execute("select state_type from flow_run order by created")]


def previous_version_intact(out: Path) -> None:
    ds = lance.dataset(str(out))
    assert ds.version == 1 and ds.to_table()["text"].to_pylist() == ["previous"] * 10


def test_sigkill_at_three_moments_then_rerun(setup, tmp_path):
    cfg, out, home, env = setup
    before = data_files(out)

    # 1. Before writing: the node below the root hangs.
    marker = tmp_path / "hang"
    proc = start(cfg, env, KAIYUAN_FAULT_INJECT=f"Filter:hang:{marker}")
    wait_until(proc, marker.exists, "the Filter node task")
    kill_all(proc)
    previous_version_intact(out)

    # 2. While writing: data files of the new version are appearing.
    proc = start(cfg, env)
    wait_until(proc, lambda: len(data_files(out) - before) >= 2, "new data files")
    kill_all(proc)
    previous_version_intact(out)

    # 3. Just before the commit: every fragment written.
    marker = tmp_path / "commit"
    proc = start(cfg, env, KAIYUAN_PAUSE_BEFORE_COMMIT=str(marker))
    wait_until(proc, marker.exists, "the commit")
    kill_all(proc)
    previous_version_intact(out)
    orphans = data_files(out) - before
    assert len(orphans) >= 24

    states = flow_run_states(home)  # each later run marks the earlier killed ones
    assert len(states) == 3 and states[-1] == "RUNNING" and set(states) <= {"RUNNING", "CRASHED"}
    rerun = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "run.py"), "--config", str(cfg), "--show-rows", "0"],
        env=env, cwd=cfg.parent, capture_output=True, text=True, timeout=400,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ds = lance.dataset(str(out))
    assert ds.count_rows() == ROWS and ds.version == 2
    named = {f.path for frag in ds.get_fragments() for f in frag.data_files()}
    assert data_files(out) == before | named  # the interrupted writes' files are gone, version 1 kept
    assert lance.dataset(str(out), version=1).count_rows() == 10
    assert flow_run_states(home) == ["CRASHED"] * 3 + ["COMPLETED"]


def test_sigterm_mid_write_cancels_and_keeps_the_previous_version(setup, tmp_path):
    cfg, out, home, env = setup
    marker = tmp_path / "commit"
    proc = start(cfg, env, KAIYUAN_PAUSE_BEFORE_COMMIT=str(marker))
    wait_until(proc, marker.exists, "the commit")
    os.kill(proc.pid, signal.SIGTERM)  # to the CLI alone, as Kubernetes does to the container's process
    time.sleep(1.0)
    marker.unlink()  # the commit may go ahead now: it must see the cancellation
    try:
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            kill_all(proc)
    assert proc.returncode == 143, output[-3000:]
    assert "cancelled" in output and "Traceback" not in output
    previous_version_intact(out)
    assert flow_run_states(home) == ["CANCELLED"]
