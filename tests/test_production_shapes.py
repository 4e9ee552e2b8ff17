"""Trees in the shape of the paper's production recipes (SPEC §1, §10): several
children directly under a writer, and a phase-mixing tree of 150+ nodes."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest

from flows.config import parse_config
from tests.conftest import read_lance

pytestmark = pytest.mark.slow


def _reader(path, cols=("id", "text_tokenized")) -> dict:
    return {"type": "LanceReader", "input_path": str(path), "select_cols": list(cols)}


def _counter(name: str, child: dict, **extra) -> dict:
    return {"type": "TokenCounter_v2", "task_name": name, **extra, "child_configs": [child]}


def test_writer_combines_several_children_by_position(run_pipeline, sample_dir, tmp_path):
    """A writer over 4 mixed branches: rows = the sum of the branches."""
    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    out = tmp_path / "mixed.lance"
    branches = [
        _reader(src),
        _counter("b1", _reader(src), drop_intermediate=True),
        {"type": "Selector", "num_rows": 100, "seed": 1, "child_configs": [_reader(src)]},
        {"type": "Selector", "selection_ratio": 0.25, "seed": 2,
         "child_configs": [_counter("b3", _reader(src), drop_intermediate=True)]},
    ]
    result = run_pipeline({"pipeline": {"type": "LanceWriter", "output_path": str(out), "child_configs": branches}})
    rows = {n["node"]: n for n in result["nodes"]}
    branch_rows = [rows[f"pipeline > child_configs[{i}] > {b['type']}"]["rows_out"] for i, b in enumerate(branches)]
    n = lance.dataset(str(src)).count_rows()
    assert branch_rows[:3] == [n, n, 100] and 0 < branch_rows[3] < n
    written = read_lance(out)
    assert written.num_rows == result["num_rows"] == sum(branch_rows)
    assert written.schema.names == ["id", "text_tokenized"]
    assert rows["pipeline > LanceWriter"]["rows_in"] == sum(branch_rows)


def test_children_of_different_widths_are_an_error_naming_both(run_pipeline, sample_dir, tmp_path):
    from tasks.base import NodeError

    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    out = tmp_path / "bad.lance"
    config = {"pipeline": {"type": "LanceWriter", "output_path": str(out),
                           "child_configs": [_reader(src), _reader(src, ("id", "text", "text_tokenized"))]}}
    with pytest.raises(Exception) as info:
        run_pipeline(config)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or getattr(e, "cause", None)
    message = next(str(x) for x in chain if isinstance(x, NodeError))
    assert "pipeline > LanceWriter" in message and "child_configs[1] has 3 columns" in message
    assert "child_configs[0] has 2" in message
    assert not out.exists()


def test_every_non_combining_node_accepts_several_children():
    from tasks.base import NODE_TYPES

    for name, cls in NODE_TYPES.items():
        if cls.max_children != 0:
            assert cls.max_children is None, name
    cfg = parse_config({"pipeline": {"type": "LanceWriterZstd", "output_path": "x.lance", "use_coalesce": True,
                                     "merge_count": 4, "child_configs": [_reader("a.lance"), _reader("b.lance")]}})
    assert len(cfg.root.children) == 2


SOURCES = 50  # 50 x (reader -> TokenCounter_v2 -> Selector) + union + counter + writer = 153 nodes


def _token_source(path, seed: int, rows: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, size=rows)
    tokens = [rng.integers(0, 50_000, size=k).astype(np.int32).tolist() for k in lengths]
    table = pa.table({"id": pa.array(np.arange(rows) + seed * 10_000, pa.int64()),
                      "text_tokenized": pa.array(tokens, pa.list_(pa.int32()))})
    lance.write_dataset(table, str(path))
    return [len(t) for t in tokens]


def test_phase_mixing_tree_of_150_nodes(run_pipeline, tmp_path):
    """The paper's phase-mixing shape: dozens of token sources, each counted
    and selected, unioned under one counter and one writer. Every source's
    token total and the mixed total are right."""

    datasets = [tmp_path / f"source{k}.lance" for k in range(5)]
    lengths = [_token_source(path, k, 200 + 40 * k) for k, path in enumerate(datasets)]
    branches = []
    for i in range(SOURCES):
        selector = {"type": "Selector", "seed": i}
        selector.update({"selection_ratio": 0.5} if i % 2 else {"num_rows": 60})
        branches.append({**selector, "child_configs": [_counter(f"source_{i}", _reader(datasets[i % 5]))]})
    out = tmp_path / "mix.lance"
    config = {
        "ray": {"app_name": "phase_mix_150"},
        "pipeline": {"type": "LanceWriter", "output_path": str(out), "child_configs": [
            _counter("mix_total", {"type": "UnionByPosition", "child_configs": branches})]},
    }
    assert len(parse_config(config).nodes()) == 3 * SOURCES + 3
    state = run_pipeline(config, return_state=True)
    result = state.result()

    written = read_lance(out)
    rows = {n["node"]: n for n in result["nodes"]}
    assert written.num_rows == result["num_rows"] == sum(
        rows[f"pipeline > child_configs[0] > child_configs[0] > child_configs[{i}] > Selector"]["rows_out"]
        for i in range(SOURCES))
    assert written.column("token_count").to_pylist() == [len(t) for t in written.column("text_tokenized").to_pylist()]

    totals = {}
    for art in _token_reports(state.state_details.flow_run_id):
        name = art.data.split("**task:** ")[1].split("\n")[0]
        totals[name] = int(art.data.split("**total tokens:** ")[1].split("\n")[0].replace(",", ""))
    for i in range(SOURCES):
        assert totals[f"source_{i}"] == sum(lengths[i % 5]), i
    assert totals["mix_total"] == int(np.sum(written.column("token_count").to_numpy()))


def _token_reports(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                         key=ArtifactFilterKey(like_="report-%tokencounter-v2"))
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=flt, limit=200)
