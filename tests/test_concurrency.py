"""Concurrent CLI runs on one Prefect database and one Ray: all complete,
concurrent appends to one target both land, concurrent overwrites of one
target leave exactly one run's rows."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import ROOT, fresh_prefect_home

pytestmark = pytest.mark.slow


def _config(tmp_path, name: str, src, out, mode: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"ray: {{app_name: {name}}}\npipeline:\n  type: LanceWriter\n  output_path: {out}\n  mode: {mode}\n"
        f"  child_configs:\n    - type: LanceReader\n      input_path: {src}\n"
    )
    return path


def _run_at_once(configs, env, address) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "flows" / "run.py"), "--config", str(c), "--ray-address", address,
                          "--show-rows", "0"], env=env, cwd=c.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in configs
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=400), *p.communicate()) for p in procs]


def test_concurrent_runs_appends_and_overwrites(ray_session, tmp_path, prefect_db_template):
    sources = []
    for k in range(3):
        src = tmp_path / f"src{k}.lance"
        lance.write_dataset(pa.table({"id": np.arange(1000) + 10_000 * k, "source": [k] * 1000}), str(src))
        sources.append(src)
    appended, overwritten, contested = tmp_path / "appended.lance", tmp_path / "overwritten.lance", tmp_path / "contested.lance"
    lance.write_dataset(pa.table({"id": np.arange(5), "source": [-1] * 5}), str(appended))

    home = fresh_prefect_home(tmp_path / "prefect-home", prefect_db_template)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    address = ray_session.get_runtime_context().gcs_address

    # Three runs at once on one database: two appends to one target, one overwrite.
    first = _run_at_once([
        _config(tmp_path, "append_a", sources[0], appended, "append"),
        _config(tmp_path, "append_b", sources[1], appended, "append"),
        _config(tmp_path, "overwrite", sources[2], overwritten, "overwrite"),
    ], env, address)
    for proc in first:
        assert proc.returncode == 0, proc.stderr[-3000:]
    table = lance.dataset(str(appended)).to_table()
    assert sorted(table["source"].to_pylist()) == [-1] * 5 + [0] * 1000 + [1] * 1000
    assert lance.dataset(str(overwritten)).count_rows() == 1000

    # Two overwrites of one target at once: exactly one run's rows.
    second = _run_at_once([
        _config(tmp_path, "overwrite_x", sources[0], contested, "overwrite"),
        _config(tmp_path, "overwrite_y", sources[1], contested, "overwrite"),
    ], env, address)
    for proc in second:
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = lance.dataset(str(contested)).to_table()
    assert rows.num_rows == 1000 and len(set(rows["source"].to_pylist())) == 1

    with sqlite3.connect(home / "prefect.db") as db:
        states = [row[0] for row in db.execute("select state_type from flow_run")]
    assert states == ["COMPLETED"] * 5


def test_relative_paths_on_a_ray_started_elsewhere(ray_session, tmp_path, prefect_db_template):
    """A recipe's relative paths mean the CLI's directory, also when the Ray
    it joins (--ray-address) was started in another one, whose workers
    resolve relative paths against their own."""
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    lance.write_dataset(pa.table({"id": np.arange(100)}), str(work / "data" / "src.lance"))
    _config(work, "relative", "data/src.lance", "data/out.lance", "overwrite")
    assert os.getcwd() != str(work)  # the session's Ray workers run elsewhere
    home = fresh_prefect_home(tmp_path / "prefect-home", prefect_db_template)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    (proc,) = _run_at_once([work / "relative.yaml"], env, ray_session.get_runtime_context().gcs_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lance.dataset(str(work / "data" / "out.lance")).count_rows() == 100
