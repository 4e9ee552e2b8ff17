"""The node catalogue: --list-nodes, --describe and the recipe JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from flows.catalog import recipe_schema
from tasks.base import NODE_TYPES
from tests.conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "flows" / "run.py"), *args], capture_output=True, text=True, timeout=120)


def test_list_nodes_lists_every_registered_node():
    proc = cli("--list-nodes")
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout
    for name, cls in NODE_TYPES.items():
        assert f"  {cls.type_name}" in listed, name
        if name != cls.type_name:
            assert name in listed, name  # aliases are named beside their node


def test_describe_shows_parameters_and_suggests():
    proc = cli("--describe", "FilterByRatio")
    assert proc.returncode == 0 and "keep_ratio: float (default 0.1" in proc.stdout and "children:" in proc.stdout
    proc = cli("--describe", "FilterByRatoi")
    assert proc.returncode == 2 and "did you mean 'FilterByRatio'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(cli("--schema").stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == json.loads(json.dumps(recipe_schema()))
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_schema_accepts_every_example(validator, example):
    errors = list(validator.iter_errors(yaml.safe_load(example.read_text())))
    assert not errors, [e.message for e in errors]


def test_schema_rejects_a_misspelt_parameter(validator):
    recipe = yaml.safe_load((ROOT / "examples" / "filter.yaml").read_text())
    node = recipe["pipeline"]["child_configs"][0]
    key = next(k for k in node if k not in ("type", "child_configs"))
    node[key + "x"] = node.pop(key)
    assert not validator.is_valid(recipe)
    recipe = yaml.safe_load((ROOT / "examples" / "filter.yaml").read_text())
    recipe["pipeline"]["type"] = "LanceWritr"
    assert not validator.is_valid(recipe)


def test_flow_mode_is_a_choice():
    """Prefect's UI offers a choice for the flow's mode, not a text box."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import kaiyuan_pipeline

    assert parameter_schema(kaiyuan_pipeline.fn).model_dump()["properties"]["mode"]["enum"] == ["local", "k8s"]


def test_describe_shows_bounds_and_parameters_without_effect():
    """Bounds declared on a parameter (``Field(ge=...)``) and parameters a node
    accepts without effect are shown with the parameter, in --describe and in
    the recipe schema."""
    from flows.catalog import describe

    text = describe("Selector")
    assert "num_partitions: int (default 32, >= 1); accepted, no effect: Ray Data partitions the data" in text
    assert "selection_ratio: float | None (default None, > 0.0, <= 1.0)" in text
    assert "global_sample_rate: float (default 0.1, >= 0.0, finite)" in describe("DuplicateSampleRatio")
    selector = recipe_schema()["$defs"]["node_Selector"]["properties"]
    assert selector["num_partitions"]["minimum"] == 1
    assert selector["num_partitions"]["description"].startswith("accepted, no effect:")
