"""Scoring nodes: fastText scorer/filter and the HF sequence classifier, with
models loaded once per actor of a Ray Data actor pool."""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pytest

from tasks.base import NODE_TYPES, NodeError, RunContext, Stream
from tests.conftest import read_lance


def node(type_name, **params):
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline > {type_name}")


@pytest.fixture(scope="module")
def models(sample_dir):
    return sample_dir / "models"


GOOD = "Research study results show that the new method improves energy efficiency in city water systems."
JUNK = "click here buy now free cheap deal casino winner prize !!!"


def test_fasttext_scorer_semantics(models):
    scorer = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q")
    table = pa.table({"text": [GOOD, JUNK, "", None, "  \n ", GOOD.upper().replace(" ", "\n", 3)]})
    q = scorer.transform(table).column("q").to_pylist()
    assert q[0] > 0.5 > q[1]
    assert q[2] == q[3] == q[4] == 0.0  # empty / null / blank -> 0
    assert q[5] == pytest.approx(q[0], abs=0.05)  # newlines -> spaces, lowercased
    # the label may be given with or without the __label__ prefix
    bare = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q", selected_label="hq")
    assert bare.transform(table).column("q").to_pylist() == q
    # a label outside the top num_labels scores 0
    top1 = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q", num_labels=1, selected_label="lq")
    assert top1.transform(table).column("q").to_pylist()[0] == 0.0
    # schema is known without loading a model
    fresh = node("FastTextScorer", model_path="/nonexistent.bin", output_col="q")
    assert fresh.output_schema(pa.schema([("text", pa.string())])).field("q").type == pa.float64()
    with pytest.raises(NodeError, match="no column 'body'"):
        node("FastTextScorer", model_path="/x.bin", input_col="body").output_schema(pa.schema([("text", pa.string())]))


def test_mmlu_model_separates_exam_questions(models):
    scorer = node("FastTextScorer", model_path=str(models / "fasttext_mmlu.bin"), selected_label="__label__mmlu", output_col="m")
    question = "Question: In physics, which of the following best describes the energy of light waves? A. mass B. speed C. heat D. color Answer: B"
    s = scorer.transform(pa.table({"text": [question, GOOD]})).column("m").to_pylist()
    assert s[0] > 0.5 > s[1]


def _run_direct(ray, node_obj, table: pa.Table, blocks: int, batch_size: int = 64):
    """Apply a node on a real Ray dataset of ``blocks`` blocks with a real
    RunStats actor; return (output table, observation)."""
    import ray.data

    from tasks.stats import RunStats

    name = f"test-stats-{uuid.uuid4().hex[:8]}"
    ns = ray.get_runtime_context().namespace
    stats = RunStats.options(name=name, namespace=ns).remote()
    try:
        ctx = RunContext(stats_actor=f"{name}/run", ray_namespace=ns, batch_size=batch_size)
        ds = ray.data.from_arrow(table).repartition(blocks)
        out = node_obj.apply([Stream(ds, table.schema)], ctx)
        result = pa.concat_tables([pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
                                   for b in out.ds.iter_batches(batch_format="pyarrow", batch_size=None)])
        obs = ray.get(stats.snapshot.remote("run"))[node_obj.path]
    finally:
        ray.kill(stats)
    return result, obs


def test_model_loads_once_per_actor_not_per_block(ray_session, models, sample_dir):
    table = read_lance(sample_dir / "scored_input.lance").select(["id", "text"]).slice(0, 1200)
    scorer = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q", concurrency=2, batch_size=50)
    out, obs = _run_direct(ray_session, scorer, table, blocks=12)
    # Once per actor, never per block: 12 blocks and 24+ batches, at most two
    # loads. Ray Data starts on the first ready actor, so on a loaded machine
    # the first can finish every block before the second's constructor does
    # (CI saw 1): "exactly 2" would be a timing assertion.
    loads = int(obs.sums["model_loads"])
    assert 1 <= loads <= 2
    assert obs.batches - 2 >= 12
    assert obs.rows_out == out.num_rows == table.num_rows
    expected = dict(zip(table["id"].to_pylist(), node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q").transform(table)["q"].to_pylist()))
    assert {i: q for i, q in zip(out["id"].to_pylist(), out["q"].to_pylist())} == expected
    report = scorer.report(obs)
    assert f"**model loads:** {loads}" in report.markdown


def test_fasttext_filter_keeps_rows_above_threshold(run_pipeline, models, sample_dir, tmp_path):
    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    out = tmp_path / "filtered.lance"
    original = read_lance(src).select(["id", "text"])
    scores = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="s").transform(original)
    threshold = float(sorted(scores["s"].to_pylist())[original.num_rows // 2])  # keeps about half
    cfg = {
        "pipeline": {
            "type": "LanceWriter", "output_path": str(out),
            "child_configs": [{
                "type": "FastTextFilter", "model_path": str(models / "fasttext_quality.bin"), "threshold": threshold, "concurrency": 1,
                "child_configs": [{
                    "type": "FastTextScorer", "model_path": str(models / "fasttext_mmlu.bin"), "selected_label": "__label__mmlu",
                    "output_col": "mmlu_score", "concurrency": 1,
                    "child_configs": [{"type": "LanceReader", "input_path": str(src), "select_cols": ["id", "text"]}],
                }],
            }],
        }
    }
    result = run_pipeline(cfg)
    expected = sorted(i for i, s in zip(scores["id"].to_pylist(), scores["s"].to_pylist()) if s > threshold)
    written = read_lance(out)
    assert sorted(written["id"].to_pylist()) == expected and result["num_rows"] == len(expected)
    assert 0 < len(expected) < original.num_rows
    assert written.column_names == ["id", "text", "mmlu_score"]  # temp_col not kept
    assert all(0.0 <= s <= 1.0 for s in written["mmlu_score"].to_pylist())


def _reference_logits(model_dir, texts, index):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            if not t or not t.strip():
                out.append(0.0)
                continue
            enc = tok([t], truncation=True, max_length=512, return_tensors="pt")
            out.append(float(model(**enc).logits[0, index]))
    return out


def test_seq_classifier_raw_logit_truncation_and_empty(models):
    model_dir = str(models / "seq_classifier")
    long_text = " ".join([GOOD] * 200)  # far beyond 512 tokens
    texts = [GOOD, JUNK, "", None, long_text]
    scorer = node("SeqClassifierScorer", model_path=model_dir, output_col="s", selected_index=1, batch_size=2)
    got = scorer.transform(pa.table({"text": texts})).column("s").to_pylist()
    ref = _reference_logits(model_dir, texts, 1)
    assert got[2] == got[3] == 0.0
    assert np.allclose(got, ref, atol=1e-4)
    with pytest.raises(NodeError, match="selected_index 5 is out of range"):
        node("SeqClassifierScorer", model_path=model_dir, output_col="s", selected_index=5).transform(pa.table({"text": [GOOD]}))


def test_seq_classifier_from_zip_through_the_flow(run_pipeline, models, sample_dir, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "seq_classifier"), "zip", root_dir=models, base_dir="seq_classifier")
    src = sample_dir / "scored_input.lance"
    out = tmp_path / "seq.lance"
    cfg = {
        "pipeline": {
            "type": "LanceWriter", "output_path": str(out),
            "child_configs": [{
                "type": "SeqClassifierScorer", "model_path": archive, "output_col": "s", "selected_index": 0, "concurrency": 1, "batch_size": 64,
                "child_configs": [{"type": "LanceReader", "input_path": str(src), "select_cols": ["id", "text"]}],
            }],
        }
    }
    result = run_pipeline(cfg)
    written = read_lance(out).sort_by("id").slice(0, 20)
    assert result["num_rows"] == read_lance(src).num_rows
    ref = _reference_logits(str(models / "seq_classifier"), written["text"].to_pylist(), 0)
    assert np.allclose(written["s"].to_pylist(), ref, atol=1e-4)


def test_remote_model_downloaded_once_into_cache(models, tmp_path, monkeypatch):
    """An object-store URI is copied into the cache once (pyarrow.fs; a local
    filesystem stands in for the object store here)."""
    import pyarrow.fs as pafs

    import tasks._models as m

    bucket = tmp_path / "bucket"
    shutil.copytree(models / "seq_classifier", bucket / "models" / "seq_classifier")
    shutil.copy(models / "fasttext_quality.bin", bucket / "models" / "q.bin")
    calls = []

    def fake_fs(uri, so):
        calls.append(uri)
        return pafs.LocalFileSystem(), str(bucket) + "/" + uri.split("://", 1)[1].split("/", 1)[1]

    monkeypatch.setattr(m, "filesystem_for", fake_fs)
    monkeypatch.setenv("KAIYUAN_MODEL_CACHE", str(tmp_path / "cache"))
    local = m.resolve_model_path("s3a://bkt/models/seq_classifier/", {})
    assert sorted(os.listdir(local)) == sorted(os.listdir(models / "seq_classifier"))
    assert m.resolve_model_path("s3://bkt/models/seq_classifier/", {}) == local
    f = m.resolve_model_path("s3://bkt/models/q.bin", {})
    assert open(f, "rb").read() == (models / "fasttext_quality.bin").read_bytes()
    m.resolve_model_path("s3://bkt/models/q.bin", {})
    assert len(calls) == 2  # one download per model, the second resolve hits the cache
    scorer = node("FastTextScorer", model_path=f, output_col="q")
    assert scorer.transform(pa.table({"text": [GOOD]}))["q"][0].as_py() > 0.5


def test_missing_model_is_caught_before_running(tmp_path):
    from flows.config import ConfigError, parse_config
    from flows.config import check_nodes

    cfg = parse_config({"pipeline": {"type": "LanceWriter", "output_path": str(tmp_path / "o.lance"), "child_configs": [{
        "type": "FastTextScorer", "model_path": str(tmp_path / "missing.bin"), "output_col": "q",
        "child_configs": [{"type": "SeqClassifierScorer", "model_path": str(tmp_path / "nodir"), "output_col": "s",
                           "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}]}]}})
    with pytest.raises(ConfigError) as err:
        check_nodes(cfg, RunContext())
    text = str(err.value)
    assert "child_configs[0] > FastTextScorer: model" in text and "missing.bin" in text
    assert "SeqClassifierScorer: model" in text and "nodir" in text
    with pytest.raises(ConfigError, match="num_labels must be >= 1"):
        parse_config({"pipeline": {"type": "FastTextScorer", "model_path": "m.bin", "num_labels": 0,
                                   "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}})


def test_seq_classifier_extra_missing_message(monkeypatch):
    from flows.config import ConfigError, parse_config

    monkeypatch.setattr(NODE_TYPES["SeqClassifierScorer"], "requires", ("no_such_torch_kaiyuan",))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[models\]'"):
        parse_config({"pipeline": {"type": "SeqClassifierScorer", "model_path": "m", "output_col": "s",
                                   "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}})
