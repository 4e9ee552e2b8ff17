"""The node contract declared in tasks/base.py: the worked example in its
docstring runs as written, and the contract's defaults and overrides hold on
the real node classes. No Ray."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest
from pydantic import ValidationError

import tasks  # noqa: F401  (registers every node type)
import tasks.base as base
from tasks.base import NODE_TYPES, Node, NodeError, RunContext
from tasks.storage import Redacted


def _example_code() -> str:
    doc = base.__doc__
    block = doc[doc.index("::\n") + 3 :]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break  # the first line back at the docstring's margin ends the block
        lines.append(line[4:])
    return "\n".join(lines)


@pytest.fixture
def example():
    """The example's namespace; its node type is unregistered afterwards so
    other tests in this process see the real node set."""
    before = dict(NODE_TYPES)
    namespace: dict = {"__name__": "node_contract_example"}
    exec(compile(_example_code(), "tasks/base.py docstring", "exec"), namespace)
    try:
        yield namespace
    finally:
        NODE_TYPES.clear()
        NODE_TYPES.update(before)


def test_the_example_is_short_and_complete():
    code = _example_code()
    assert "@register" in code and "Field(" in code and "def transform" in code
    assert len(code.strip().splitlines()) < 40


def test_the_worked_example_runs(example):
    cls = NODE_TYPES["ClipScores"]
    assert cls is example["ClipScores"]
    params = cls.Params(column="score", high=0.5)
    node = cls(params, "pipeline/ClipScores")
    assert cls.validate_params(params) == []
    out = node.transform(pa.table({"score": [-1.0, 0.25, 0.75, None], "id": [1, 2, 3, 4]}))
    assert out.column("score").to_pylist() == [0.0, 0.25, 0.5, None]
    assert out.column("id").to_pylist() == [1, 2, 3, 4]
    assert node.output_schema(pa.schema([("score", pa.float64())])) == pa.schema([("score", pa.float64())])
    # the declared constraints and the cross-field check
    with pytest.raises(ValidationError):
        cls.Params(column="score", high=2e9)
    assert cls.validate_params(cls.Params(column="score", low=0.8, high=0.2))
    with pytest.raises(NodeError, match=re.escape("pipeline/ClipScores: no column 'score'")):
        node.transform(pa.table({"other": [1.0]}))


def _node(type_name: str, **params) -> Node:
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline/{type_name}")


def test_output_uri():
    assert _node("Filter", column="s", threshold=0.5).output_uri() is None
    assert _node("LanceReader", input_path="in.lance").output_uri() is None
    writer = _node("LanceWriter", output_path="s3a://bucket/out.lance")
    assert writer.output_uri() == "s3://bucket/out.lance"
    assert writer.output_uris() == [writer.output_uri()]
    assert NODE_TYPES["LanceWriterZstd"].output_uri is NODE_TYPES["LanceWriter"].output_uri


def test_storage_options():
    ctx = RunContext(storage_options=Redacted({"aws_region": "run-region"}))
    own = {"aws_region": "node-region"}
    # default: the run's options, a copy the caller may change, values never in its repr
    plain = _node("Filter", column="s", threshold=0.5)
    got = plain.storage_options(ctx)
    assert got == {"aws_region": "run-region"} and isinstance(got, dict)
    assert "run-region" not in repr(got)
    got["x"] = "y"
    assert "x" not in ctx.storage_options
    # nodes with a storage_options parameter resolve it over the run's
    for node in (
        _node("LanceReader", input_path="in.lance", storage_options=own),
        _node("LanceWriter", output_path="out.lance", storage_options=own),
        _node("FastTextScorer", model_path="m.bin", storage_options=own),
    ):
        assert node.storage_options(ctx) == own, node.path
        assert "node-region" not in repr(node.storage_options(ctx))
        without = type(node)(node.params.model_copy(update={"storage_options": None}), node.path)
        assert without.storage_options(ctx) == {"aws_region": "run-region"}, node.path


def test_checkpoint_by_default():
    assert Node.checkpoint_by_default is False
    assert NODE_TYPES["MinHash"].checkpoint_by_default is True
    assert [name for name, cls in NODE_TYPES.items() if cls.checkpoint_by_default] == ["MinHash"]


def test_report_metrics_without_stats_is_a_no_op():
    _node("Filter", column="s", threshold=0.5).report_metrics(RunContext(), {"kept": 3})


def test_report_metrics_goes_to_the_runs_stats(monkeypatch):
    calls = []

    class Client:
        def add_metrics(self, node_path, sums, seconds=0.0):
            calls.append((node_path, sums))

    monkeypatch.setattr(base, "_stats_client", lambda name, namespace: Client() if name else None)
    node = _node("Filter", column="s", threshold=0.5)
    node.report_metrics(RunContext(stats_actor="actor/run"), {"kept": 3, "dropped": 1.5})
    assert calls == [("pipeline/Filter", {"kept": 3.0, "dropped": 1.5})]
    assert all(type(v) is float for v in calls[0][1].values())
