"""Token nodes: Tokenization, (Batch)Detokenization, TokenCounter_v2 on real
Ray + Lance, with Arrow list<int32> token columns end to end."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.base import NODE_TYPES, NodeError
from tests.conftest import read_lance


def node(type_name, **params):
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline > {type_name}")


@pytest.fixture(scope="module")
def tokenizer_dir(sample_dir):
    return str(sample_dir / "models" / "tokenizer")


TEXTS = [
    "Model data training language text quality.",
    "我们今天在北京研究人工智能。数据、模型和文本！",
    "Mixed 中文 and English, with punctuation?! And  double  spaces\tand tabs.",
    "",
    None,
]


def test_tokenization_gives_int32_lists_with_special_token_and_round_trips(tokenizer_dir):
    tok = node("Tokenization", tokenizer_name_or_path=tokenizer_dir)
    out = tok.transform(pa.table({"text": pa.array(TEXTS, pa.string())}))
    ids = out.column("text_tokenized")
    assert ids.type == pa.list_(pa.int32())
    rows = ids.to_pylist()
    assert all(r[0] == 1 for r in rows)  # <s> added to every text, "" and null included
    assert rows[3] == [1] and rows[4] == [1]
    assert tok.output_schema(pa.schema([("text", pa.string())])).field("text_tokenized").type == pa.list_(pa.int32())
    detok = node("Detokenization", tokenizer_name_or_path=tokenizer_dir, clean_up_tokenization_spaces=False)
    back = detok.transform(out).column("text_decoded").to_pylist()
    assert back == [t or "" for t in TEXTS]  # byte-level BPE: exact round trip


def test_detokenization_reads_any_integer_list_type_and_nulls(tokenizer_dir):
    tok = node("Tokenization", tokenizer_name_or_path=tokenizer_dir)
    ids = tok.transform(pa.table({"text": ["Hello world .", "Second row"]})).column("text_tokenized").to_pylist()
    for typ in (pa.list_(pa.int64()), pa.large_list(pa.int32()), pa.list_(pa.uint16())):
        col = pa.array(ids + [None], typ)
        # a sliced column: offsets do not start at 0
        table = pa.table({"text_tokenized": pa.concat_arrays([pa.array([[5, 6]], typ), col])}).slice(1)
        out = node("BatchDetokenization", tokenizer_name_or_path=tokenizer_dir).transform(table)
        assert out.column("text_decoded").to_pylist() == ["Hello world.", "Second row", None]  # " ." cleaned up
    raw = node("BatchDetokenization", tokenizer_name_or_path=tokenizer_dir, clean_up_tokenization_spaces=False, skip_special_tokens=False)
    out = raw.transform(pa.table({"text_tokenized": pa.array(ids, pa.list_(pa.int32()))}))
    assert out.column("text_decoded").to_pylist() == ["<s>Hello world .", "<s>Second row"]
    with pytest.raises(NodeError, match="list of integer token ids"):
        node("Detokenization", tokenizer_name_or_path=tokenizer_dir).output_schema(pa.schema([("text_tokenized", pa.string())]))


def test_transformers_autotokenizer_agrees_with_the_node(tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    texts = [t for t in TEXTS if t]
    mine = node("Tokenization", tokenizer_name_or_path=tokenizer_dir).transform(pa.table({"text": texts}))
    assert mine.column("text_tokenized").to_pylist() == hf(texts)["input_ids"]


def test_token_counter_counts_list_lengths_with_duplicates_and_drop():
    table = pa.table({
        "text_tokenized": pa.array([[1, 2, 3], [], None, [4] * 10], pa.list_(pa.int32())),
        "duplicate_count": [2.0, 5.0, 3.0, None],
    })
    plain = node("TokenCounter_v2").transform(table)
    assert plain.column("token_count").to_pylist() == [3, 0, 0, 10]
    assert plain.column("token_count").type == pa.int64()
    dup = node("TokenCounter_v2", with_duplicate_count=True).transform(table)
    assert dup.column("token_count").to_pylist() == [6, 0, 0, 10]
    assert node("TokenCounter_v2", summary=False).observe is None
    with pytest.raises(NodeError, match="holds text"):
        node("TokenCounter_v2", input_col="t").transform(pa.table({"t": ["abc"]}))
    with pytest.raises(NodeError, match="no column 'text_tokenized'"):
        node("TokenCounter_v2").transform(pa.table({"x": [1]}))


def test_tokenize_detokenize_count_through_ray_and_lance(run_pipeline, sample_dir, tokenizer_dir, tmp_path):
    """Ray hands batches over as Arrow: counts must equal list lengths (the old
    port counted 0) and detokenize(tokenize(text)) must give the text back."""
    from tests.test_foundation import _artifacts, _latest_flow_run

    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    out = tmp_path / "tok.lance"
    cfg = {
        "ray": {"app_name": "tok-test", "data": {"batch_size": 128}},
        "pipeline": {
            "type": "LanceWriter", "output_path": str(out),
            "child_configs": [{
                "type": "TokenCounter_v2", "task_name": "tok-test", "drop_intermediate": False,
                "child_configs": [{
                    "type": "BatchDetokenization", "tokenizer_name_or_path": tokenizer_dir, "batch_size": 300,
                    "clean_up_tokenization_spaces": False, "concurrency": 1,
                    "child_configs": [{
                        "type": "Tokenization", "tokenizer_name_or_path": tokenizer_dir, "concurrency": 1,
                        "child_configs": [{"type": "LanceReader", "input_path": str(src), "select_cols": ["id", "text"], "num_parallel": 4}],
                    }],
                }],
            }],
        },
    }
    result = run_pipeline(cfg)
    written = read_lance(out)
    original = read_lance(src)
    assert result["num_rows"] == written.num_rows == original.num_rows
    assert written.schema.field("text_tokenized").type == pa.list_(pa.int32())
    rows = written.to_pylist()
    assert all(r["token_count"] == len(r["text_tokenized"]) > 1 for r in rows)
    assert all(r["text_decoded"] == r["text"] for r in rows)
    total = sum(r["token_count"] for r in rows)
    arts = {a.key: a for a in _artifacts(_latest_flow_run().id)}
    summary = arts["report-0-tokencounter-v2"].data
    assert "tok-test" in summary and f"**total tokens:** {total:,}" in summary and f"**rows:** {len(rows):,}" in summary


def test_drop_intermediate_still_reports(run_pipeline, sample_dir, tmp_path):
    from tests.test_foundation import _artifacts, _latest_flow_run

    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    cfg = {
        "pipeline": {
            "type": "TokenCounter_v2", "drop_intermediate": True, "task_name": "existing-tokens",
            "child_configs": [{"type": "LanceReader", "input_path": str(src), "select_cols": ["id", "text_tokenized"]}],
        }
    }
    result = run_pipeline(cfg)
    assert result["preview_columns"] == ["id", "text_tokenized"]
    expected = sum(len(x) for x in read_lance(src).column("text_tokenized").to_pylist())
    summary = {a.key: a for a in _artifacts(_latest_flow_run().id)}["report-tokencounter-v2"].data  # the root
    assert f"**total tokens:** {expected:,}" in summary


def test_missing_tokenizer_fails_validation_naming_the_node(tmp_path):
    from flows.config import ConfigError, parse_config
    from flows.config import check_nodes
    from tasks.base import RunContext

    cfg = parse_config({"pipeline": {"type": "Tokenization", "tokenizer_name_or_path": str(tmp_path / "nope"),
                                     "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}})
    with pytest.raises(ConfigError) as err:
        check_nodes(cfg, RunContext())
    assert "pipeline > Tokenization" in str(err.value) and "nope" in str(err.value)
    hub = parse_config({"pipeline": {"type": "Tokenization", "tokenizer_name_or_path": "Qwen/Qwen2-7B",
                                     "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}})
    with pytest.raises(ConfigError, match="never downloaded from a model hub"):
        check_nodes(hub, RunContext())


def test_missing_extra_fails_validation_with_install_command(monkeypatch):
    from flows.config import ConfigError, parse_config

    monkeypatch.setattr(NODE_TYPES["Tokenization"], "requires", ("no_such_module_kaiyuan",))
    with pytest.raises(ConfigError) as err:
        parse_config({"pipeline": {"type": "Tokenization", "tokenizer_name_or_path": "t",
                                   "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}})
    assert "pipeline > Tokenization" in str(err.value) and "pip install -e '.[tokenizers]'" in str(err.value)
