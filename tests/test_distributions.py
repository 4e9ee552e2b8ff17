"""Score distributions as node reports (issue 22): FilterByRatio, Selector
(by score), AddRankQuantile and the scorers publish a histogram of the score
with the threshold and the kept share, from what they compute anyway (no
extra pass). Counts are exact: checked against the data, directly on Ray
with a real stats actor, and end to end as Prefect artifacts on the node's
task run."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pyarrow as pa
import pytest

import tasks  # noqa: F401  (registers every node)
from tasks.base import NODE_TYPES, Observation, RunContext, Stream
from tasks.reports import histogram_report
from tasks.rowkeys import Threshold
from tasks.scoring import FASTTEXT_EDGES, fasttext_sums, logit_histogram, logit_sums
from tasks.selection import distribution_sums
from tests.conftest import read_lance


def node(type_name: str, **params):
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline > {type_name}")


def add_sums(parts: list[dict]) -> dict:
    """What the stats actor does with the sums of several calls."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def in_bin(values: np.ndarray, lo: float, hi: float, last: bool) -> np.ndarray:
    return (values >= lo) & ((values <= hi) if last else (values < hi))


# -- rendering and sums, no Ray ----------------------------------------------


def test_histogram_report_marks_the_threshold_bin():
    rep = histogram_report("T", [0.0, 0.5, 1.0], [3, 1], kept=[0, 1], mark=1, lines=["**x**"])
    assert "◀ threshold" in rep.markdown.splitlines()[-1] and "◀" not in rep.markdown.splitlines()[-2]
    assert "█" in rep.markdown
    assert rep.table == [{"bin_lo": 0.0, "bin_hi": 0.5, "count": 3, "kept": 0, "threshold": False},
                         {"bin_lo": 0.5, "bin_hi": 1.0, "count": 1, "kept": 1, "threshold": True}]


@pytest.mark.parametrize("larger", [True, False])
def test_selection_sums_are_exact_per_bin(larger):
    rng = np.random.default_rng(1)
    s = np.round(rng.random(5000), 3)  # ties
    prepared = s if larger else -s
    edges = np.linspace(prepared.min(), prepared.max(), 4097)
    edges[-1] = np.nextafter(prepared.max(), np.inf)
    counts = np.bincount(np.clip(np.searchsorted(edges, prepared, "right") - 1, 0, 4095), minlength=4096)
    t = float(np.sort(prepared)[-700])
    kept_mask = prepared >= t
    sums = distribution_sums((edges, counts), Threshold(t, 0), int(kept_mask.sum()), len(s), larger)
    comparison = "larger" if larger else "smaller"
    rep = node("FilterByRatio", column="s", keep_ratio=0.14, comparison=comparison).report(
        Observation(rows_in=len(s) + 7, sums=sums))
    assert 20 <= len(rep.table) <= 40
    assert sum(r["count"] for r in rep.table) == len(s)
    assert sum(r["kept"] for r in rep.table) == kept_mask.sum()
    assert [r["threshold"] for r in rep.table].count(True) == 1
    kept_values = s[kept_mask]
    for r in rep.table:  # in the column's own values; for "smaller" the bins are (lo, hi]
        lo, hi = r["bin_lo"], r["bin_hi"]
        sel = in_bin(s, lo, hi, False) if larger else (s > lo) & (s <= hi)
        assert sel.sum() == r["count"]
        ksel = in_bin(kept_values, lo, hi, False) if larger else (kept_values > lo) & (kept_values <= hi)
        assert ksel.sum() == r["kept"]
    threshold = float(-t if not larger else t)
    assert f"**threshold:** {threshold:.6g}" in rep.markdown
    assert f"**kept:** {kept_mask.sum():,} of {len(s) + 7:,} rows" in rep.markdown
    assert "**rows without a score** (null or NaN, never kept): 7" in rep.markdown


def test_selection_sums_without_a_search():
    # All rows kept: no refinement ran, the histogram is the one range bin.
    sums = distribution_sums((np.array([0.2, 0.9]), np.array([40])), Threshold(-math.inf, 0), 40, 40, True)
    rep = node("FilterByRatio", column="s", keep_ratio=1.0).report(Observation(rows_in=40, sums=sums))
    assert rep.table == [{"bin_lo": 0.2, "bin_hi": 0.9, "count": 40, "kept": 40, "threshold": False}]
    assert "**kept:** 40 of 40 rows (100.00%)" in rep.markdown and "threshold:**" not in rep.markdown
    # No row has a score: the shares, no table.
    sums = distribution_sums(None, Threshold(math.inf, 1 << 64), 0, 0, True)
    rep = node("FilterByRatio", column="s").report(Observation(rows_in=5, sums=sums))
    assert rep.table is None and "**kept:** 0 of 5 rows" in rep.markdown
    # A node task that ran twice (a retry) reported twice: one histogram still.
    once = distribution_sums((np.array([0.0, 1.0]), np.array([4])), Threshold(-math.inf, 0), 4, 4, True)
    twice = node("FilterByRatio", column="s").report(Observation(rows_in=4, sums=add_sums([once, once])))
    assert twice.table == [{"bin_lo": 0.0, "bin_hi": 1.0, "count": 4, "kept": 4, "threshold": False}]
    assert node("FilterByRatio", column="s").report(Observation()) is None


def test_fasttext_sums_add_up_over_batches():
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.random(997), [0.0, 1.0, 0.5]])
    parts = [fasttext_sums(b, 0.5) for b in np.array_split(scores, 7)]
    n = node("FastTextFilter", model_path="m.bin", threshold=0.5)
    rep = n.report(Observation(rows_in=len(scores), rows_out=int((scores > 0.5).sum()), sums=add_sums(parts)))
    assert len(rep.table) == 20 and sum(r["count"] for r in rep.table) == len(scores)
    for i, r in enumerate(rep.table):
        assert (r["bin_lo"], r["bin_hi"]) == (FASTTEXT_EDGES[i], FASTTEXT_EDGES[i + 1])
        assert r["count"] == in_bin(scores, r["bin_lo"], r["bin_hi"], i == 19).sum()
        assert r["kept"] == (in_bin(scores, r["bin_lo"], r["bin_hi"], i == 19) & (scores > 0.5)).sum()
    assert [r["threshold"] for r in rep.table].index(True) == 10  # [0.5, 0.55) holds 0.5
    assert f"**kept:** {(scores > 0.5).sum():,} of 1,000 rows" in rep.markdown and "**threshold:** 0.5" in rep.markdown
    scorer = node("FastTextScorer", model_path="m.bin", output_col="q")
    rep = scorer.report(Observation(rows_in=len(scores), sums=add_sums([fasttext_sums(b) for b in np.array_split(scores, 3)])))
    assert "kept" not in rep.table[0] and "threshold:**" not in rep.markdown
    assert sum(r["count"] for r in rep.table) == len(scores)
    assert scorer.report(Observation()) is None  # nothing observed: no report, as before


def test_logit_bins_line_up_across_batches():
    rng = np.random.default_rng(3)
    logits = np.concatenate([rng.normal(0, 3, 2000), [12.5, -40.0, np.nan]])
    sums = add_sums([logit_sums(b) for b in np.array_split(logits, 9)])
    edges, counts = logit_histogram(sums)
    assert len(counts) <= 32 and counts.sum() == 2002 and sums["dist:nan"] == 1 and sums["dist:scored"] == 2003
    for i, c in enumerate(counts):
        assert c == ((logits >= edges[i]) & (logits < edges[i + 1])).sum()
    rep = node("SeqClassifierScorer", model_path="m", output_col="s").report(Observation(rows_in=2003, sums=sums))
    assert sum(r["count"] for r in rep.table) == 2002 and "**NaN scores:** 1" in rep.markdown


def test_add_rank_quantile_report_from_sums():
    n = node("AddRankQuantile", score_col="s")
    scores = np.linspace(1.0, 0.0, 7)  # descending: rank r has scores[r - 1]
    send_sums: list[dict] = []
    n.report_metrics = lambda ctx, sums: send_sums.append(sums)  # what reaches the stats actor
    send = n._quantile_scores(7, RunContext())
    for part in np.array_split(np.arange(7), 3):
        send(pa.table({"s": scores[part]}), part + 1)
    rep = n.report(Observation(rows_out=7, sums=add_sums(send_sums)))
    ranks = [max(1, math.ceil(i * 7 / 20)) for i in range(21)]
    assert [r["rank"] for r in rep.table] == ranks
    assert [r["score"] for r in rep.table] == [scores[r - 1] for r in ranks]
    assert rep.table[-1]["quantile"] == 1.0 and "7 rows" in rep.markdown


# -- directly on Ray, with a real stats actor ----------------------------------


@pytest.fixture(scope="module")
def ray_data(ray_session):
    from flows.runtime import configure_ray_data

    configure_ray_data(None)
    return ray_session


def run_direct(ray, n, t: pa.Table, blocks: int = 3, batch_size: int | None = None):
    """Apply ``n`` to ``t`` on Ray with a real RunStats actor: (output, observation)."""
    import ray.data

    from tasks.stats import RunStats

    name = f"test-dist-{uuid.uuid4().hex[:8]}"
    ns = ray.get_runtime_context().namespace
    stats = RunStats.options(name=name, namespace=ns).remote()
    try:
        ctx = RunContext(stats_actor=f"{name}/run", ray_namespace=ns, batch_size=batch_size)
        out = n.apply([Stream(ray.data.from_arrow(t).repartition(blocks), t.schema)], ctx)
        parts = list(out.ds.iter_batches(batch_format="pyarrow", batch_size=None))
        result = pa.concat_tables(parts) if parts else out.schema.empty_table()
        obs = ray.get(stats.snapshot.remote("run"))[n.path]
    finally:
        ray.kill(stats)
    return result, obs


def scored_table(n: int = 3000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    s = np.round(rng.normal(0, 1, n), 2)  # ties
    s = pa.array(s, mask=np.arange(n) % 50 == 0)  # 60 nulls: never kept, not scored
    return pa.table({"id": np.arange(n, dtype=np.int64), "s": s})


def check_selection_report(rep, t: pa.Table, out: pa.Table, larger: bool):
    s = t["s"].to_numpy(zero_copy_only=False)
    valid = s[~np.isnan(s)]
    kept = out["s"].to_numpy(zero_copy_only=False)
    assert sum(r["count"] for r in rep.table) == len(valid)
    assert sum(r["kept"] for r in rep.table) == out.num_rows
    for r in rep.table:
        lo, hi = r["bin_lo"], r["bin_hi"]
        sel = (lambda v: (v >= lo) & (v < hi)) if larger else (lambda v: (v > lo) & (v <= hi))
        assert sel(valid).sum() == r["count"] and sel(kept).sum() == r["kept"]
    marked = [r for r in rep.table if r["threshold"]]
    assert len(marked) == 1 and 0 < marked[0]["kept"] <= marked[0]["count"]
    threshold = float(rep.markdown.split("**threshold:** ")[1].split(" ")[0])
    if larger:
        assert kept.min() >= threshold and (valid[valid > threshold].size <= out.num_rows)
    else:
        assert kept.max() <= threshold and (valid[valid < threshold].size <= out.num_rows)
    assert f"**kept:** {out.num_rows:,} of {t.num_rows:,} rows" in rep.markdown


@pytest.mark.parametrize("comparison", ["larger", "smaller"])
def test_filter_by_ratio_reports_its_distribution(ray_data, comparison):
    t = scored_table()
    n = node("FilterByRatio", column="s", keep_ratio=0.2, comparison=comparison, quantile_error=0.0)
    out, obs = run_direct(ray_data, n, t)
    assert out.num_rows == round(0.2 * (t.num_rows - 60))
    rep = n.report(obs)
    check_selection_report(rep, t, out, comparison == "larger")
    assert "split by content hash" in rep.markdown  # 0.01-rounded scores: the threshold cuts a tie


def test_selector_by_score_reports_its_distribution_and_others_do_not(ray_data):
    t = scored_table(seed=1)
    n = node("Selector", num_rows=500, method="approximate", score_col="s")
    out, obs = run_direct(ray_data, n, t)
    assert out.num_rows == 500
    check_selection_report(n.report(obs), t, out, True)
    random = node("Selector", num_rows=500, method="random")
    _, obs = run_direct(ray_data, random, t)
    assert random.report(obs) is None


def test_add_rank_quantile_reports_scores_at_quantiles(ray_data):
    t = scored_table(n=1000, seed=2)
    n = node("AddRankQuantile", score_col="s")
    out, obs = run_direct(ray_data, n, t, blocks=4)
    rep = n.report(obs)
    by_rank = dict(zip(out["rank"].to_pylist(), out["s"].to_pylist()))
    assert len(rep.table) == 21
    for r in rep.table:
        assert r["score"] == by_rank[r["rank"]] and r["quantile"] == r["rank"] / 1000
    assert rep.table[-1]["score"] is None and "| null |" in rep.markdown  # nulls rank last


@pytest.fixture(scope="module")
def models(sample_dir):
    return sample_dir / "models"


def test_fasttext_filter_and_scorer_report_on_ray(ray_data, models, sample_dir):
    t = read_lance(sample_dir / "scored_input.lance").select(["id", "text"]).slice(0, 600)
    scorer = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q", concurrency=1, batch_size=64)
    out, obs = run_direct(ray_data, scorer, t, blocks=4)
    q = out["q"].to_numpy()
    rep = scorer.report(obs)
    assert sum(r["count"] for r in rep.table) == t.num_rows and "**model loads:**" in rep.markdown
    for i, r in enumerate(rep.table):
        assert r["count"] == in_bin(q, r["bin_lo"], r["bin_hi"], i == 19).sum()
    threshold = float(np.median(q))
    filt = node("FastTextFilter", model_path=str(models / "fasttext_quality.bin"), threshold=threshold, concurrency=1, batch_size=64)
    kept, obs = run_direct(ray_data, filt, t, blocks=4)
    rep = filt.report(obs)
    assert kept.num_rows == (q > threshold).sum() == sum(r["kept"] for r in rep.table)
    assert sum(r["count"] for r in rep.table) == t.num_rows
    assert f"**kept:** {kept.num_rows:,} of {t.num_rows:,} rows" in rep.markdown
    assert rep.table[int(np.searchsorted(FASTTEXT_EDGES, threshold, "right") - 1)]["threshold"]


def test_seq_classifier_reports_its_logits(ray_data, models, sample_dir):
    pytest.importorskip("transformers")
    t = read_lance(sample_dir / "scored_input.lance").select(["id", "text"]).slice(0, 48)
    n = node("SeqClassifierScorer", model_path=str(models / "seq_classifier"), output_col="s", concurrency=1, batch_size=16)
    out, obs = run_direct(ray_data, n, t, blocks=2)
    rep = n.report(obs)
    s = out["s"].to_numpy()
    assert sum(r["count"] for r in rep.table) == t.num_rows
    for r in rep.table:
        assert r["count"] == ((s >= r["bin_lo"]) & (s < r["bin_hi"])).sum()


# -- end to end: Prefect artifacts on the node's task run -------------------------------


def _flow_artifacts():
    """The latest flow run's task runs and artifacts."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        deadline = time.monotonic() + 15  # task runs are recorded in batches, up to a second late
        while True:
            tasks_ = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            if len(tasks_) >= 5 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return {t.name: t.id for t in tasks_}, arts


def _table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_distributions_are_artifacts_on_the_node_task_runs(run_pipeline, models, sample_dir, tmp_path):
    src = sample_dir / "scored_input.lance"
    out_path = tmp_path / "out.lance"
    source = read_lance(src)
    quality = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q").transform(source)
    ft_threshold = float(np.median(quality["q"].to_numpy()))  # keeps about half
    cfg = {
        "prefect": {"progress_after_s": 600},
        "pipeline": {
            "type": "LanceWriter", "output_path": str(out_path),
            "child_configs": [{
                "type": "AddRankQuantile", "score_col": "score",
                "child_configs": [{
                    "type": "FastTextFilter", "model_path": str(models / "fasttext_quality.bin"), "threshold": ft_threshold,
                    "concurrency": 1,
                    "child_configs": [{
                        "type": "FilterByRatio", "column": "fasttext_score", "keep_ratio": 0.4, "quantile_error": 0.0,
                        "child_configs": [{"type": "LanceReader", "input_path": str(src), "select_cols": ["id", "text", "fasttext_score", "score"]}],
                    }],
                }],
            }],
        },
    }
    result = run_pipeline(cfg)
    written = read_lance(out_path)
    rows = {n["type"]: n for n in result["nodes"]}
    task_ids, arts = _flow_artifacts()
    filter_path = "pipeline > child_configs[0] > child_configs[0] > child_configs[0] > FilterByRatio"
    fasttext_path = "pipeline > child_configs[0] > child_configs[0] > FastTextFilter"
    rank_path = "pipeline > child_configs[0] > AddRankQuantile"

    def report_of(path: str):
        """The node's distribution: a markdown and a table artifact on its own task run."""
        mine = [a for a in arts if a.task_run_id == task_ids[path]]
        md = [a for a in mine if a.type == "markdown" and a.data.startswith("### Distribution")]
        table = [a for a in mine if a.type == "table"]
        assert len(md) == 1 and len(table) == 1, [(a.key, a.type) for a in mine]
        return md[0].data, _table(table[0])

    # FilterByRatio
    md, bins = report_of(filter_path)
    kept_by_ratio = rows["FilterByRatio"]["rows_out"]
    assert kept_by_ratio == round(0.4 * source.num_rows)
    assert sum(b["count"] for b in bins) == source.num_rows  # no nulls in this column
    assert sum(b["kept"] for b in bins) == kept_by_ratio
    assert sum(b["threshold"] for b in bins) == 1
    assert f"**kept:** {kept_by_ratio:,} of {source.num_rows:,} rows ({100 * kept_by_ratio / source.num_rows:.2f}%)" in md
    assert "◀ threshold" in md and "█" in md
    threshold = float(md.split("**threshold:** ")[1].split(" ")[0])
    assert min(written["fasttext_score"].to_pylist()) >= threshold

    # FastTextFilter: its threshold and kept share, and the model line.
    md, bins = report_of(fasttext_path)
    assert sum(b["count"] for b in bins) == kept_by_ratio == rows["FastTextFilter"]["rows_in"]
    assert sum(b["kept"] for b in bins) == rows["FastTextFilter"]["rows_out"] == written.num_rows > 0
    assert f"**threshold:** {ft_threshold:g}" in md and f"**kept:** {written.num_rows:,} of {kept_by_ratio:,} rows" in md
    assert "**model loads:**" in md

    # AddRankQuantile: the score at every 5% of the ranks.
    md, quantiles = report_of(rank_path)
    by_rank = dict(zip(written["rank"].to_pylist(), written["score"].to_pylist()))
    assert len(quantiles) == 21 and all(q["score"] == by_rank[q["rank"]] for q in quantiles)
    assert quantiles[-1]["rank"] == written.num_rows and f"{written.num_rows:,} rows" in md
