"""Parameter details checked against SPEC, node by node: each test names the
SPEC text it holds the code to."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

import tasks  # noqa: F401  (registers every node)
from tasks.base import NODE_TYPES, RunContext, Stream


@pytest.fixture(scope="module")
def ray_data(ray_session):
    from flows.runtime import configure_ray_data

    configure_ray_data(None)
    return ray_session


def node(type_name: str, **params):
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline > {type_name}")


def run(n, t: pa.Table, blocks: int = 3) -> pa.Table:
    import ray

    out = n.apply([Stream(ray.data.from_arrow(t).repartition(blocks), t.schema)], RunContext())
    parts = list(out.ds.iter_batches(batch_format="pyarrow", batch_size=None))
    result = pa.concat_tables(parts) if parts else out.schema.empty_table()
    assert result.schema.equals(out.schema)
    return result


def adjacent_repeats(values) -> int:
    return int((np.diff(np.asarray(values)) == 0).sum())


# SPEC §6 Selector: `method` picks random / fast_random / head / tail /
# approximate; the `approximate` flag must not turn another method into a
# top-N by score.
def test_selector_approximate_flag_keeps_the_method(ray_data):
    t = pa.table({"id": np.arange(200), "s": np.arange(200, dtype=np.float64)})
    flagged = run(node("Selector", num_rows=10, method="random", seed=2, approximate=True, score_col="s"), t)
    plain = run(node("Selector", num_rows=10, method="random", seed=2), t)
    assert flagged.column("id").to_pylist() == plain.column("id").to_pylist()
    assert flagged.column("id").to_pylist() != list(range(199, 189, -1))
    head = run(node("Selector", num_rows=5, method="head", approximate=True, score_col="s"), t)
    assert head.column("id").to_pylist() == [0, 1, 2, 3, 4]
    top = run(node("Selector", num_rows=3, method="approximate", approximate=True, score_col="s"), t)
    assert top.column("id").to_pylist() == [199, 198, 197]


# SPEC §1: accepted parameters with nothing to do on Ray are logged, not
# dropped silently.
def test_parameters_without_effect_are_logged(ray_data, caplog):
    t = pa.table({"id": np.arange(20), "s": np.arange(20, dtype=np.float64)})
    with caplog.at_level(logging.INFO, logger="kaiyuan.nodes"):
        run(node("Selector", num_rows=5, method="head"), t)
        assert "no effect" not in caplog.text
        run(node("Selector", num_rows=5, method="head", num_partitions=8), t)
        run(node("Reorder", score_cols="s", num_partitions=8), t)
    lines = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("pipeline > Selector: num_partitions accepted, no effect")
    assert lines[1].startswith("pipeline > Reorder: num_partitions accepted, no effect")


# SPEC §6 Shuffler: seeded and reproducible for the same input and seed
# (DEVELOPERS: whatever the block count); a shuffle spreads repeated rows.
def test_shuffler_same_order_whatever_block_count_and_spreads_repeats(ray_data):
    t = pa.table({"id": np.arange(300), "v": np.arange(300) // 20})
    n = node("Shuffler", seed=3)
    a, b = run(n, t, 2), run(n, t, 5)
    assert a.equals(b)
    assert sorted(a.column("id").to_pylist()) == list(range(300))
    assert a.column("id").to_pylist() != list(range(300))
    assert a.column("id").to_pylist() != run(node("Shuffler", seed=4), t, 2).column("id").to_pylist()
    repeats = pa.table({"v": np.repeat(np.arange(5), 20)})  # 5 rows, 20 identical copies each
    assert adjacent_repeats(run(n, repeats).column("v")) < 40  # ~19 expected; 95 if copies stayed together
    assert run(n, t.slice(0, 0), 1).num_rows == 0


# SPEC §6 InterleavedReorder: "rescale rank to rank / group_size * total_rows"
# with rank 1..n (as AddRankQuantile's rank): each group ends at N, so with
# ascending: true the best row of every group, even a one-row group, is last.
def test_interleaved_reorder_rank_starts_at_one(ray_data):
    t = pa.table({"id": np.arange(10), "type": np.array([0] + [1] * 9), "s": np.arange(10, dtype=np.float64)})
    out = run(node("InterleavedReorder", group_col="type", type_num=2, score_cols=["s", "s"], seed=1), t, 2)
    order = out.column("id").to_pylist()
    assert order.index(0) >= 8  # rescaled rank 1/1 x 10 = 10, tied only with group 1's best
    assert [i for i in order if i != 0] == list(range(1, 10))


def test_seq_classifier_max_length_range_message():
    cls = NODE_TYPES["SeqClassifierScorer"]
    assert cls.validate_params(cls.Params(model_path="m", max_length=0)) == ["max_length must be in [1, 32768], got 0"]
    assert cls.validate_params(cls.Params(model_path="m", max_length=10**6)) == ["max_length must be in [1, 32768], got 1000000"]
