"""Selection, sampling, ordering and combining nodes (SPEC §6, §7) on real Ray
and Lance: semantics per node, ties, seeded reproducibility across block
counts, list columns intact, Splitter atomicity, bad input, the examples."""

from __future__ import annotations

import os
from collections import Counter

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import tasks  # noqa: F401  (registers every node)
from tasks.base import NODE_TYPES, NodeError, RunContext, Stream
from tests.conftest import ROOT, read_lance

N = 3000


@pytest.fixture(scope="module")
def ray_data(ray_session):
    from flows.runtime import configure_ray_data

    configure_ray_data(None)
    return ray_session


def table(n: int = N, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": np.arange(n, dtype=np.int64),
            "type": (np.arange(n) % 3).astype(np.int64),
            "tie": rng.integers(0, 3, size=n).astype(np.float64),  # 3 values: heavy ties
            "s": np.round(rng.random(n), 2),
            "dc": rng.random(n) * 3,
            "toks": pa.array([list(range(i % 5)) for i in range(n)], pa.list_(pa.int32())),
            "conv": pa.array(
                [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}][: i % 3] for i in range(n)],
                pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
            ),
            "meta": pa.array([{"url": f"u{i}", "score": float(i)} for i in range(n)]),
        }
    )


def node(type_name: str, **params):
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline > {type_name}")


def stream(t: pa.Table, blocks: int = 3) -> Stream:
    import ray

    return Stream(ray.data.from_arrow(t).repartition(blocks), t.schema)


def run(n, t: pa.Table, blocks: int = 3, ctx: RunContext | None = None, others: list[pa.Table] | None = None) -> pa.Table:
    inputs = [stream(t, blocks)] + [stream(o, 2) for o in others or []]
    out = n.apply(inputs, ctx or RunContext())
    parts = list(out.ds.iter_batches(batch_format="pyarrow", batch_size=None))
    result = pa.concat_tables(parts) if parts else out.schema.empty_table()
    assert result.schema.equals(out.schema), f"declared {out.schema} vs produced {result.schema}"
    return result


def ids(t: pa.Table) -> list[int]:
    return t.column("id").to_pylist()


# -- FilterByRatio ---------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.33, 0.0, 1.0])
def test_filter_by_ratio_heavy_ties_keeps_exact_fraction(ray_data, ratio):
    t = table()
    out = run(node("FilterByRatio", column="tie", keep_ratio=ratio, quantile_error=0.0), t)
    assert out.num_rows == round(ratio * N)
    if 0 < out.num_rows < N:
        # the kept rows are the top ones: nothing dropped is larger than anything kept
        dropped = set(range(N)) - set(ids(out))
        assert min(out.column("tie").to_pylist()) >= max(t.column("tie").to_numpy()[sorted(dropped)])
    assert ids(out) == sorted(ids(out))  # input order kept
    assert out.column("toks").to_pylist() == t.take(pa.array(ids(out), pa.int64())).column("toks").to_pylist()


def test_filter_by_ratio_smaller_within_quantile_error_and_block_independent(ray_data):
    t = table(seed=3)
    n = node("FilterByRatio", column="s", comparison="smaller", keep_ratio=0.25, quantile_error=0.01)
    a, b = run(n, t, blocks=2), run(n, t, blocks=7)
    assert abs(a.num_rows - 0.25 * N) <= 0.01 * N
    assert ids(a) == ids(b)
    assert max(a.column("s").to_pylist()) <= np.quantile(t.column("s").to_numpy(), 0.27)


def test_filter_by_ratio_nulls_never_kept_and_empty_input(ray_data):
    t = pa.table({"id": np.arange(10), "x": pa.array([None, 1.0, float("nan"), 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])})
    out = run(node("FilterByRatio", column="x", keep_ratio=0.5, quantile_error=0.0), t)
    assert ids(out) == [6, 7, 8, 9]  # 8 valid rows, top half
    empty = run(node("FilterByRatio", column="x", keep_ratio=0.5), t.slice(0, 0))
    assert empty.num_rows == 0


@pytest.mark.parametrize(
    "column,message", [("nope", "no column 'nope'"), ("conv", "not numeric")]
)
def test_filter_by_ratio_bad_column_names_the_node(ray_data, column, message):
    with pytest.raises(NodeError, match=message) as info:
        run(node("FilterByRatio", column=column), table(50))
    assert "FilterByRatio" in str(info.value)


# -- Selector ----------------------------------------------------------------


def test_selector_methods(ray_data):
    t = table()
    assert ids(run(node("Selector", num_rows=5, method="head"), t)) == [0, 1, 2, 3, 4]
    assert ids(run(node("Selector", num_rows=N - 3, method="tail"), t)) == [N - 3, N - 2, N - 1]
    assert run(node("Selector", selection_ratio=0.1, method="head"), t).num_rows == N // 10
    rnd = node("Selector", num_rows=123, method="random", seed=5)
    a, b = run(rnd, t, 2), run(rnd, t, 6)
    assert a.num_rows == 123 and ids(a) == ids(b) and ids(a) == sorted(ids(a))
    assert ids(run(node("Selector", num_rows=123, method="random", seed=6), t)) != ids(a)
    ratio = node("Selector", selection_ratio=0.2, method="random", seed=5)
    r1, r2 = run(ratio, t, 2), run(ratio, t, 5)
    assert ids(r1) == ids(r2) and abs(r1.num_rows - 0.2 * N) < 0.05 * N
    fast = run(node("Selector", num_rows=300, method="fast_random", seed=1), t)
    assert abs(fast.num_rows - 300) < 80
    top = run(node("Selector", num_rows=10, method="approximate", score_col="s"), t)
    assert top.column("s").to_pylist() == sorted(t.column("s").to_pylist(), reverse=True)[:10]


def test_selector_validation():
    from flows.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="exactly one of num_rows or selection_ratio"):
        parse_config({"pipeline": {"type": "Selector", "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}})


# -- Sampling ------------------------------------------------------------------


def test_duplicate_sample_ratio_sampler_flatten(ray_data):
    t = pa.table({"id": np.arange(6), "dc": pa.array([1.0, 30.0, None, 2.5, -1.0, 0.0]), "toks": pa.array([[1, 2]] * 6)})
    out = run(node("DuplicateSampleRatio", col="dc", global_sample_rate=0.5, max_sample=10.0), t)
    assert out.column("dc").to_pylist() == [0.5, 10.0, 0.0, 1.25, -0.5, 0.0]
    text = pa.table({"dc": pa.array(["4", "x", None])})
    assert run(node("DuplicateSampleRatio", col="dc", global_sample_rate=0.5), text).column("dc").to_pylist() == [2.0, 0.0, 0.0]

    big = table(seed=1)
    sampler = node("Sampler", col="dc", seed=9)
    a, b = run(sampler, big, 2), run(sampler, big, 5)
    assert a.column("dc").type == pa.int64() and ids(a) == ids(b)
    v = big.column("dc").to_numpy()[ids(a)]
    got = a.column("dc").to_numpy()
    assert ((got == np.floor(v)) | (got == np.floor(v) + 1)).all() and (got > 0).all()
    expected_total = big.column("dc").to_numpy().sum()
    assert abs(got.sum() - expected_total) < 0.05 * expected_total  # E[count] = v

    flat = run(node("Flatten", col="dc"), a)
    assert "dc" not in flat.column_names and flat.num_rows == got.sum()
    assert Counter(ids(flat)) == dict(zip(ids(a), got.tolist()))
    first = flat.filter(pc.equal(flat.column("id"), ids(a)[0]))
    assert first.column("conv").to_pylist()[0] == big.column("conv").to_pylist()[ids(a)[0]]


def test_flatten_non_numeric_is_an_error(ray_data):
    with pytest.raises(NodeError, match="not numeric"):
        run(node("Flatten", col="conv"), table(20))


def test_group_flatten_pads_and_takes_struct_fields(ray_data):
    t = pa.table(
        {
            "id": [1, 2, 3],
            "conv": pa.array(
                [[{"role": "u", "content": "a"}, {"role": "a", "content": "b"}], [], [{"role": "u", "content": "c"}]]
            ),
            "toks": pa.array([[10], None, [30, 31, 32]]),
        }
    )
    n = node("GroupFlatten", cols=["conv", "toks"], sub_cols=["conv.content", "toks"], output_cols=["content", "tok"])
    out = run(n, t, 1)
    assert out.select(["id", "content", "tok"]).to_pylist() == [
        {"id": 1, "content": "a", "tok": 10},
        {"id": 1, "content": "b", "tok": None},
        {"id": 3, "content": "c", "tok": 30},
        {"id": 3, "content": None, "tok": 31},
        {"id": 3, "content": None, "tok": 32},
    ]


# -- Ordering -------------------------------------------------------------------


def test_reorder_multi_key_folding_and_reproducible(ray_data):
    t = table(seed=2)
    r = node("Reorder", score_cols=["tie", "s"], ascending=[False, True])
    a, b = run(r, t, 2), run(r, t, 6)
    assert ids(a) == ids(b)
    keys = list(zip(a.column("tie").to_pylist(), a.column("s").to_pylist()))
    assert keys == sorted(keys, key=lambda k: (-k[0], k[1]))
    assert a.column("toks").to_pylist() == t.take(pa.array(ids(a), pa.int64())).column("toks").to_pylist()
    folded = run(node("Reorder", score_cols="s", folding=2, use_random_tiebreaker=True, seed=1), t)
    half = N // 2
    first, second = folded.column("s").to_numpy()[:half], folded.column("s").to_numpy()[half:]
    assert (np.diff(first) >= 0).all() and (np.diff(second) >= 0).all()
    assert set(folded.column("id").to_numpy()[:half] % 2) == {0}  # even positions first


def test_interleaved_reorder_spreads_groups_in_their_own_order(ray_data):
    t = table(seed=4)
    n = node("InterleavedReorder", group_col="type", type_num=3, score_cols=["s", "__random__", "tie"], seed=3)
    a, b = run(n, t, 2), run(n, t, 5)
    assert ids(a) == ids(b) and sorted(ids(a)) == list(range(N))
    types = np.array(a.column("type").to_pylist())
    for chunk in np.array_split(types, 10):  # every tenth of the output has each group ~1/3
        assert all(abs((chunk == g).mean() - 1 / 3) < 0.05 for g in range(3))
    g0 = a.filter(pc.equal(a.column("type"), 0)).column("s").to_numpy()
    assert (np.diff(g0) >= 0).all()  # ascending: best last
    desc = run(node("InterleavedReorder", group_col="type", type_num=3, score_cols="s", ascending=False, perturb=1.0, seed=3), t)
    g1 = desc.filter(pc.equal(desc.column("type"), 1)).column("s").to_numpy()
    assert g1[0] == g1.max() and g1[-1] == g1.min()


def test_interleaved_reorder_bad_group_value(ray_data):
    t = table(30)
    from flows.errors import user_message

    with pytest.raises(Exception) as info:
        run(node("InterleavedReorder", group_col="type", type_num=2, score_cols=["s", "s"]), t)
    message = user_message(info.value) or str(info.value)  # the NodeError, wherever Ray wrapped it
    assert message and "InterleavedReorder" in message and "outside 0..1" in message


def test_add_rank_quantile(ray_data):
    t = table(seed=5)
    out = run(node("AddRankQuantile", score_col="s"), t, 4)
    assert out.column("rank").to_pylist() == list(range(1, N + 1))
    assert out.column("quantile").to_pylist()[-1] == 1.0
    assert (np.diff(out.column("s").to_numpy()) <= 0).all()
    asc = run(node("AddRankQuantile", score_col="s", ascending=True, add_quantile=False), t, 2)
    assert "quantile" not in asc.column_names and (np.diff(asc.column("s").to_numpy()) >= 0).all()


# -- Combining --------------------------------------------------------------------


def test_joiner_zips_by_position_with_suffixes(ray_data):
    t = table(100)
    other = pa.table({"id": np.arange(80) * 10, "x": np.ones(80)})
    out = run(node("Joiner"), t, 3, others=[other])
    assert out.num_rows == 80
    assert out.column_names == t.column_names + ["id_1", "x"]
    assert out.column("id_1").to_pylist() == [i * 10 for i in out.column("id").to_pylist()]


def _splitter(tmp_path, **kw):
    params = dict(train_file=str(tmp_path / "train.lance"), val_file=str(tmp_path / "val.lance"), num_train=2000, seed=1)
    params.update(kw)
    return node("Splitter", **params)


def test_splitter_exact_random_disjoint_reproducible(ray_data, tmp_path):
    t = table()
    out = _splitter(tmp_path).apply([stream(t, 3)], RunContext())
    train, val = read_lance(tmp_path / "train.lance"), read_lance(tmp_path / "val.lance")
    assert train.num_rows == 2000 and val.num_rows == N - 2000 == out.num_rows
    assert sorted(ids(train) + ids(val)) == list(range(N))
    assert ids(train) != list(range(2000))  # random, not a head slice
    assert train.column("conv").to_pylist() == t.take(pa.array(ids(train), pa.int64())).column("conv").to_pylist()
    _splitter(tmp_path).apply([stream(t, 7)], RunContext())
    assert ids(read_lance(tmp_path / "train.lance")) == ids(train)
    _splitter(tmp_path, split_method="fast_approximate", num_train=0.5, select_cols=["id", "toks"]).apply([stream(t, 3)], RunContext())
    train2 = read_lance(tmp_path / "train.lance")
    assert train2.column_names == ["id", "toks"] and abs(train2.num_rows - N / 2) < 0.06 * N
    assert ids(train2) != list(range(train2.num_rows))


def test_splitter_both_outputs_or_neither(ray_data, tmp_path, monkeypatch):
    t = table()
    splitter_cls = NODE_TYPES["Splitter"]
    _splitter(tmp_path).apply([stream(t, 3)], RunContext())
    before = {name: lance.dataset(str(tmp_path / name)).version for name in ("train.lance", "val.lance")}
    original = splitter_cls._write_part
    calls = []

    def second_write_fails(self, writer, ds, schema, ctx):
        calls.append(writer.output_uri())
        if len(calls) == 2:
            raise RuntimeError("injected failure in the validation write")
        return original(self, writer, ds, schema, ctx)

    monkeypatch.setattr(splitter_cls, "_write_part", second_write_fails)
    with pytest.raises(RuntimeError, match="injected"):
        _splitter(tmp_path, num_train=10, seed=2).apply([stream(t, 3)], RunContext())
    # existing outputs: unchanged, and the uncommitted train fragments are gone
    for name, version in before.items():
        ds = lance.dataset(str(tmp_path / name))
        assert ds.version == version
    assert read_lance(tmp_path / "train.lance").num_rows == 2000
    committed = {f.path for frag in lance.dataset(str(tmp_path / "train.lance")).get_fragments() for f in frag.metadata.files}
    assert set(os.listdir(tmp_path / "train.lance" / "data")) == committed
    # new outputs: neither exists afterwards
    calls.clear()
    with pytest.raises(RuntimeError, match="injected"):
        _splitter(tmp_path, train_file=str(tmp_path / "t2.lance"), val_file=str(tmp_path / "v2.lance")).apply(
            [stream(t, 3)], RunContext()
        )
    assert not (tmp_path / "t2.lance").exists() and not (tmp_path / "v2.lance").exists()


# -- End to end: reproducible across reader block counts ---------------------------------


def _mix_config(src, out, blocks: int) -> dict:
    def reader(cols):
        return {"type": "LanceReader", "input_path": str(src), "num_parallel": blocks, "select_cols": cols}

    return {
        "ray": {"app_name": "mix", "seed": 5},
        "pipeline": {
            "type": "LanceWriter",
            "output_path": str(out),
            "child_configs": [
                {
                    "type": "InterleavedReorder",
                    "group_col": "type",
                    "type_num": 2,
                    "score_cols": ["fasttext_score", "__random__"],
                    "perturb": 0.3,
                    "child_configs": [
                        {
                            "type": "UnionByName",
                            "allow_missing_columns": True,
                            "child_configs": [
                                {
                                    "type": "AddConstants", "constant_list": [0], "column_list": ["type"],
                                    "child_configs": [{
                                        "type": "FilterByRatio", "column": "fasttext_score", "keep_ratio": 0.4,
                                        "child_configs": [reader(["id", "fasttext_score", "text_tokenized"])],
                                    }],
                                },
                                {
                                    "type": "AddConstants", "constant_list": [1], "column_list": ["type"],
                                    "child_configs": [{
                                        "type": "Flatten",
                                        "child_configs": [{
                                            "type": "Sampler",
                                            "child_configs": [{
                                                "type": "DuplicateSampleRatio", "global_sample_rate": 1.5,
                                                "child_configs": [{
                                                    "type": "Selector", "selection_ratio": 0.5,
                                                    "child_configs": [reader(["id", "duplicate_count", "conversation"])],
                                                }],
                                            }],
                                        }],
                                    }],
                                },
                            ],
                        }
                    ],
                }
            ],
        },
    }


def test_pipeline_reproducible_across_block_counts(run_pipeline, sample_dir, tmp_path):
    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    a = run_pipeline(_mix_config(src, tmp_path / "a.lance", 2))
    b = run_pipeline(_mix_config(src, tmp_path / "b.lance", 5))
    ta, tb = read_lance(tmp_path / "a.lance"), read_lance(tmp_path / "b.lance")
    assert a["num_rows"] == b["num_rows"] == ta.num_rows > 0
    assert ta.equals(tb)
    kept = ta.filter(pc.equal(ta.column("type"), 0))
    assert kept.num_rows == round(0.4 * 2000)
    counts = {n["type"]: n["rows_out"] for n in a["nodes"]}
    assert counts["FilterByRatio"] == kept.num_rows


# -- Examples -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["filter", "sample", "group_reorder", "quantile_slice", "phase_mix"])
def test_examples_run(run_pipeline, repo_sample_data, monkeypatch, name):
    monkeypatch.chdir(ROOT)
    result = run_pipeline(str(ROOT / "examples" / f"{name}.yaml"))
    assert result["num_rows"] > 0
    written = read_lance(ROOT / result["output_path"])
    assert written.num_rows == result["num_rows"]
    total = lance.dataset(str(repo_sample_data / "scored_input.lance")).count_rows()
    slack = max(1.0, 1e-4 * total)  # the examples' quantile_error
    if name == "filter":
        assert abs(written.num_rows - 0.3 * total) <= slack
    if name == "quantile_slice":
        assert abs(written.num_rows - 0.12 * 0.17 * total) <= 2 * slack + 1
