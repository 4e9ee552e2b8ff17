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


# The heaviest files first, so that the two xdist workers (pyproject addopts)
# finish together instead of one starting a long file at the end.
_HEAVY_FIRST = ["test_prefect_ops.py", "test_cli_history.py", "test_cluster_s3.py", "test_minhash.py",
                "test_selection.py", "test_model_examples.py", "test_writers.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (Prefect's own test harness: a temporary server over
    a temporary database) for every flow run in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_session(prefect_api):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """Small generated sample datasets (the same generator as the examples)."""
    from flows.sample_data import generate_all

    out = tmp_path_factory.mktemp("sample")
    generate_all(str(out), rows=2000, seed=0)
    return out


@pytest.fixture(scope="session")
def repo_sample_data() -> Path:
    """data/sample in the repository (what the examples read), generated if missing."""
    from flows.sample_data import ensure_sample_data

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
