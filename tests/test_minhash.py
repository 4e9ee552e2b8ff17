"""MinHash (SPEC §9): quality against exact ground truth, distributed connected
components against a single-process union-find, determinism across block
counts, checkpoint resume, bad input, and the recipes end to end."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bench.minhash_corpus import evaluate, ground_truth_pairs, make_corpus
from tasks.base import NodeError, Observation, RunContext, Stream
from tasks.minhash import KEY, MinHash, MinHashParams, connected_components, optimal_bands, signature_matrix, permutations


def node(**kw) -> MinHash:
    params = {"num_permutations": 128, "threshold": 0.7, "num_parallel": 4, **kw}
    return MinHash(MinHashParams(**params), "pipeline/MinHash")


def stream_of(table: pa.Table, blocks: int = 4) -> Stream:
    import ray

    n = table.num_rows
    size = max(1, -(-n // blocks))
    parts = [table.slice(i, size) for i in range(0, n, size)] or [table]
    return Stream(ray.data.from_arrow(parts), table.schema)


def collect(ds) -> pa.Table:  # test helper: small data only
    batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(batches) if batches else None


def union_find(edges) -> dict:
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return {x: find(x) for x in parent}


def labels_by_id(res) -> dict:
    """id -> predicted cluster label (component minimum key, or own key)."""
    keys = collect(res.prepped.select_columns(["id", KEY]))
    lab = collect(res.labels)
    label_of_key = dict(zip(lab.column("u").to_pylist(), lab.column("v").to_pylist())) if lab is not None else {}
    return {i: label_of_key.get(k, k) for i, k in zip(keys.column("id").to_pylist(), keys.column(KEY).to_pylist())}


# ---------------------------------------------------------------------------


def test_band_choice_matches_spec():
    assert optimal_bands(0.7, 128) == (14, 9)
    assert optimal_bands(0.7, 64) == (8, 8)
    assert node().bands() == (14, 9)
    assert node(num_permutations=64).bands() == (8, 8)


def test_normalisation_makes_equivalent_texts_equal():
    a, b = permutations(32, 1234)
    texts = pa.array(
        [
            "Héllo, WORLD!!  Café 2024 and 17 apples; more words follow here",
            "hello world cafe 0 and 0 apples more words follow here",
            "HELLO\tworld\x07 café 99 and 5 apples ... more -- words follow here!",
        ]
    )
    sig, ntok = signature_matrix(texts, "en", 5, 5, a, b)
    assert ntok.tolist() == [11, 11, 11]
    assert (sig[0] == sig[1]).all() and (sig[1] == sig[2]).all()
    zh = pa.array(["我们今天在北京研究人工智能和语言模型的数据质量", "我们今天在北京研究人工智能和语言模型的数据质量！！"])
    sig, ntok = signature_matrix(zh, "zh", 5, 5, a, b)
    assert ntok[0] >= 5 and (sig[0] == sig[1]).all()


def test_quality_against_exact_jaccard_and_union_find(ray_session, tmp_path):
    corpus = make_corpus(10_000, seed=3)  # 3,690 pairs with Jaccard >= 0.8
    pairs = ground_truth_pairs(corpus, n_random=10_000)
    res = node(num_parallel=8).run(stream_of(corpus, 8), RunContext(work_dir=str(tmp_path)))
    out = collect(res.output)
    label_of = labels_by_id(res)
    kept = set(out.column("id").to_pylist())
    removed = set(label_of) - kept
    metrics = evaluate(corpus, label_of, removed, pairs)
    print(metrics, res.stats)
    assert metrics["pairs_j_ge_0_8"] > 3000
    assert metrics["recall_j_ge_0_8"] >= 0.99
    assert metrics["false_removal_rate"] <= 0.005
    # one survivor per predicted cluster, carrying the cluster's count
    sizes: dict = {}
    for lab in label_of.values():
        sizes[lab] = sizes.get(lab, 0) + 1
    assert out.num_rows == len(sizes) == res.stats["documents_out"]
    assert sorted(out.column("duplicate_count").to_pylist()) == sorted(float(s) for s in sizes.values())
    assert res.stats["removed"] == len(removed) and res.stats["largest_cluster"] == max(sizes.values())
    # distributed components == single-process union-find on the same edges
    edges = collect(res.edges)
    uf = union_find(zip(edges.column("u").to_pylist(), edges.column("v").to_pylist()))
    lab = collect(res.labels)
    dist = dict(zip(lab.column("u").to_pylist(), lab.column("v").to_pylist()))
    assert {x: dist.get(x, x) for x in uf} == uf


def test_connected_components_on_chains_and_random_graphs(ray_session):
    import ray

    rng = np.random.default_rng(5)
    # long chains in shuffled label order (many rounds), plus a random sparse graph
    nodes = rng.permutation(4000).astype(np.int64) * 7919 - 10_000_000
    chains = [(nodes[i], nodes[i + 1]) for i in range(0, 1999) if i % 400 != 399]
    rand = [tuple(rng.choice(nodes[2000:], 2, replace=False)) for _ in range(1500)]
    edges = [(max(u, v), min(u, v)) for u, v in chains + rand if u != v]
    ds = ray.data.from_arrow(
        [pa.table({"u": np.array([e[0] for e in part], np.int64), "v": np.array([e[1] for e in part], np.int64)})
         for part in np.array_split(np.array(edges), 6)]
    )
    labels, rounds = connected_components(ds, 4)
    got = collect(labels)
    dist = dict(zip(got.column("u").to_pylist(), got.column("v").to_pylist()))
    uf = union_find(edges)
    assert {x: dist.get(x, x) for x in uf} == uf
    assert rounds >= 2


def test_same_survivors_whatever_the_block_count_and_order(ray_session, tmp_path):
    corpus = make_corpus(3000, seed=11)
    # exact copies of whole rows and of texts with other ids: ties must be stable
    corpus = pa.concat_tables([corpus, corpus.slice(0, 50), corpus.slice(50, 50).set_column(0, "id", pa.array(np.arange(10**6, 10**6 + 50)))])
    results = []
    for i, blocks in enumerate((2, 8, 32)):
        table = corpus if i != 1 else corpus.take(np.random.default_rng(1).permutation(corpus.num_rows))
        res = node(num_parallel=3 + i).run(stream_of(table, blocks), RunContext(work_dir=str(tmp_path / f"w{blocks}")))
        out = collect(res.output)
        results.append(sorted(zip(out.column("id").to_pylist(), out.column("duplicate_count").to_pylist())))
    assert results[0] == results[1] == results[2]
    assert sum(dc for _, dc in results[0]) == corpus.num_rows


def test_resume_reads_signatures_from_the_checkpoint(ray_session, tmp_path):
    corpus = make_corpus(1500, seed=2)
    ctx = RunContext(work_dir=str(tmp_path))
    first = node().run(stream_of(corpus, 4), ctx)
    a = sorted(collect(first.output).column("id").to_pylist())
    assert not first.resumed and first.checkpoint.startswith(str(tmp_path))
    again = node(num_parallel=2).run(stream_of(corpus, 3), ctx)  # width does not change the key
    assert again.resumed and again.checkpoint == first.checkpoint
    assert sorted(collect(again.output).column("id").to_pylist()) == a
    other = node(seed=99).run(stream_of(corpus, 4), ctx)  # other params: other checkpoint
    assert not other.resumed and other.checkpoint != first.checkpoint


def test_bad_input_is_handled(ray_session, tmp_path):
    big = " ".join(["lorem ipsum dolor sit amet consectetur"] * 150_000)  # ~5.7 MB
    assert len(big) > 5_000_000
    good = "the same long enough document about data quality and near duplicate removal"
    texts = [None, "", "   \n\t", "a b", good, good + " !", big, big]
    raw = pa.array([None if t is None else t.encode() for t in texts] + [b"\xff\xfe bad bytes " + good.encode()], pa.binary())
    table = pa.table({"id": np.arange(len(raw), dtype=np.int64), "text": raw.view(pa.string())})  # invalid UTF-8 inside
    res = node(num_permutations=64).run(stream_of(table, 3), RunContext(work_dir=str(tmp_path)))
    out = collect(res.output)
    got = dict(zip(out.column("id").to_pylist(), out.column("duplicate_count").to_pylist()))
    # null/blank dropped; the short one kept; good twins merged (with the bad-bytes one), big twins merged
    assert 0 not in got and 1 not in got and 2 not in got
    assert got[3] == 1.0
    assert sorted(got.values()) == [1.0, 2.0, 3.0]
    assert out.column("text").type == pa.string()
    # binary text column: decoded with replacement
    res = node(num_permutations=64).run(stream_of(pa.table({"text": raw}), 2), RunContext(work_dir=str(tmp_path)))
    assert collect(res.output).column("text").type == pa.large_string()


def test_empty_and_missing_column(ray_session, tmp_path):
    ctx = RunContext(work_dir=str(tmp_path))
    empty = pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())})
    res = node().run(stream_of(empty, 1), ctx)
    assert collect(res.output) is None and res.stats["documents_considered"] == 0
    with pytest.raises(NodeError, match="pipeline/MinHash: input_col_name 'text' is not a column"):
        node().apply([stream_of(pa.table({"body": ["x y z"]}), 1)], ctx)
    with pytest.raises(NodeError, match="must be a string column"):
        node().apply([stream_of(pa.table({"text": [1, 2]}), 1)], ctx)


def test_report_lists_the_dedup_figures():
    obs = Observation(rows_in=100, rows_out=80, sums={"minhash.documents_considered": 95, "minhash.removed": 15,
                                                      "minhash.clusters": 6, "minhash.largest_cluster": 4})
    rep = node().report(obs)
    assert "14 x 9" in rep.markdown and "largest cluster | 4" in rep.markdown
    assert "false-positive" in rep.markdown and "15.7895%" in rep.markdown
    assert node().report(Observation()) is None


def test_examples_run_through_the_flow(run_pipeline, sample_dir, tmp_path):
    import yaml

    from tests.conftest import ROOT

    for name, data in (("dedup.yaml", "dclm_subset.lance"), ("dedup_zh.yaml", "fineweb_chinese.lance")):
        cfg = yaml.safe_load((ROOT / "examples" / name).read_text())
        cfg["pipeline"]["output_path"] = str(tmp_path / f"{name}.lance")
        cfg["pipeline"]["child_configs"][0]["child_configs"][0]["input_path"] = str(sample_dir / data)
        result = run_pipeline(cfg)
        rows = {n["type"]: n for n in result["nodes"]}
        assert 0 < rows["MinHash"]["rows_out"] < rows["MinHash"]["rows_in"]
        assert result["num_rows"] == rows["MinHash"]["rows_out"]
        assert "duplicate_count" in result["preview_columns"]
