"""Shared fixtures: one real local Ray and one real Prefect API for the session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Runs in tests start their own Ray and Prefect API unless a test says otherwise
# (a developer's `ray start --head` or `prefect server start` must not be joined).
os.environ.setdefault("KAIYUAN_FIND_SERVICES", "0")


# The heaviest files first, so that the two xdist workers (pyproject addopts)
# finish together instead of one starting a long file at the end.
_HEAVY_FIRST = ["test_prefect_ops.py", "test_kills.py", "test_concurrency.py", "test_cli_history.py",
                "test_cluster_sim.py", "test_production_shapes.py", "test_minhash.py", "test_minhash_scale.py",
                "test_selection.py", "test_model_examples.py", "test_writers.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def pytest_configure(config):
    """Refuse the pytest/pytest-xdist pair on which ``--dist loadgroup``
    silently stops grouping (pytest 9.2 ignores the ``@group`` suffix that
    xdist <= 3.8 puts on node ids: pytest-dev/pytest-xdist#1386). The grouped
    modules' servers would then be built on both workers: minutes of suite
    time, and two servers competing for two cores."""
    from importlib.metadata import version

    from packaging.version import Version

    if config.getoption("dist", "no") == "loadgroup" and Version(pytest.__version__) >= Version("9.2") \
            and Version(version("pytest-xdist")) < Version("3.9"):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {version('pytest-xdist')} does not honour xdist_group "
            "marks; install the versions pyproject.toml pins (pip install -e '.[dev]')"
        )


def _shared_once(tmp_path_factory, name: str, build) -> Path:
    """A directory built once per test session and shared by the xdist
    workers (their base temp dirs have one parent); ``build(path)`` fills it."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".complete").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            build(path)
            (path / ".complete").write_text("")
    return path


@pytest.fixture(scope="session")
def prefect_db_template(tmp_path_factory) -> Path:
    """A Prefect SQLite database with every migration applied, made once.

    Migrating a new database costs about 15 CPU-seconds here; tests whose
    subject is not a first start copy this one (``fresh_prefect_home``)."""

    def build(path: Path) -> None:
        import subprocess

        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(path), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
        subprocess.run([prefect, "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True, timeout=600)

    return _shared_once(tmp_path_factory, "prefect-db-template", build) / "prefect.db"


def fresh_prefect_home(home: Path, template: Path) -> Path:
    """``home`` as a new PREFECT_HOME whose database is a copy of the template."""
    import shutil

    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, home / "prefect.db")
    return home


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory, prefect_db_template):
    """A real Prefect API for every flow run in the session: the project's own
    local API server (flows.runtime.prefect_api, what a local run starts),
    over a fresh database in a temporary PREFECT_HOME."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings

    from flows import runtime

    home = fresh_prefect_home(tmp_path_factory.mktemp("prefect-home"), prefect_db_template)
    db = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_API_DATABASE_CONNECTION_URL: db}):
        with runtime.prefect_api() as url:
            yield url


@pytest.fixture(scope="session")
def ray_session(prefect_api):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """Small generated sample datasets (the same generator as the examples),
    made once for all xdist workers."""
    from samples.data import generate_all

    return _shared_once(tmp_path_factory, "sample", lambda path: generate_all(str(path), rows=2000, seed=0))


@pytest.fixture(scope="session")
def repo_sample_data() -> Path:
    """data/sample in the repository (what the examples read), generated if missing."""
    from samples.data import ensure_sample_data

    out = ROOT / "data" / "sample"
    ensure_sample_data(str(out))
    return out


def write_config(tmp_path: Path, config: dict | str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def run_pipeline(ray_session, tmp_path):
    """Run a config (dict, YAML text or path) through the real Prefect flow."""
    from flows.pipeline import kaiyuan_pipeline

    def run(config, **kwargs) -> dict:
        path = config if isinstance(config, (str, Path)) and str(config).endswith(".yaml") and Path(config).exists() else write_config(tmp_path, config)
        return kaiyuan_pipeline(config=str(path), **kwargs)

    return run


def read_lance(path) -> "pyarrow.Table":  # noqa: F821 - test helper, small data only
    import lance

    return lance.dataset(str(path)).to_table()


def node_stats(markdown: str) -> dict[str, str]:
    """The rows/time/status table of a node's artifact (flows/report.py), as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    return dict(zip(cells(lines[0]), cells(lines[2])))
