"""Each text/scoring/token example runs on the repository's sample data
through the real flow, as `python flows/run.py --config examples/NAME.yaml`
would run it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.conftest import ROOT, read_lance


@pytest.fixture(scope="module")
def sample_models(repo_sample_data):
    from samples.models import build_all

    models = repo_sample_data / "models"
    needed = ["fasttext_quality.bin", "fasttext_mmlu.bin", "tokenizer/tokenizer.json", "seq_classifier/config.json"]
    if not all((models / n).exists() for n in needed):
        build_all(str(repo_sample_data), seed=0)
    return models


@pytest.mark.slow
@pytest.mark.parametrize("name, check", [
    ("fasttext", lambda t: t.schema.field("quality_score").type == pa.float64() and t.num_rows == 10_000),
    ("mmlu_fasttext", lambda t: "mmlu_score" in t.column_names and "filter_score" not in t.column_names and 0 < t.num_rows < 10_000),
    ("seq_classifier", lambda t: "edu_logit" in t.column_names and t.num_rows == 10_000),
    ("clean_zh", lambda t: "clean_text" in t.column_names and 0 < t.num_rows < 10_000),
    ("tokenize", lambda t: t.column_names == ["id", "text_tokenized", "token_count"]
        and t.schema.field("text_tokenized").type == pa.list_(pa.int32())
        and pa.compute.all(pa.compute.equal(pa.compute.list_value_length(t["text_tokenized"]), t["token_count"])).as_py()),
    ("detokenize", lambda t: t["text_decoded"].to_pylist() == t["text"].to_pylist()),
])
def test_model_example_runs(name, check, run_pipeline, sample_models, monkeypatch):
    import yaml

    monkeypatch.chdir(ROOT)
    path = ROOT / "examples" / f"{name}.yaml"
    result = run_pipeline(str(path))
    out = ROOT / yaml.safe_load(path.read_text())["pipeline"]["output_path"]
    table = read_lance(out)
    assert result["num_rows"] == table.num_rows
    assert check(table), f"{name}: unexpected output {table.schema}"
    if name == "detokenize":
        import lance

        assert len(lance.dataset(str(out)).get_fragments()) <= 2  # coalesced into num_output_files
