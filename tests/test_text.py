"""Text nodes: ConversationToParagraph, ParseJsonString, ChineseCleanAndFilter."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.base import NODE_TYPES, NodeError
from tests.conftest import read_lance

FIXTURES = Path(__file__).parent / "fixtures"
CONV = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def node(type_name, **params):
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline > {type_name}")


# -- ConversationToParagraph -------------------------------------------------


def test_conversation_joins_contents_with_nulls_and_slices():
    conv = pa.array([
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, {"role": "assistant", "content": "Hello!"}],
        None,
        [],
        [{"role": "user", "content": "你好"}],
    ], CONV)
    table = pa.table({"conversation": pa.chunked_array([conv.slice(0, 2), conv.slice(2)])})
    n = node("ConversationToParagraph", input_col="conversation", output_col="text")
    assert n.transform(table).column("text").to_pylist() == ["Hi\n\nHello!", None, "", "你好"]
    sep = node("ConversationToParagraph", input_col="conversation", output_col="t", separator=" | ", field_key="role")
    assert sep.transform(table.slice(1)).column("t").to_pylist() == [None, "", "user"]
    plain = node("ConversationToParagraph", input_col="c", output_col="t")
    assert plain.transform(pa.table({"c": pa.array([["a", "b"], ["c"]])})).column("t").to_pylist() == ["a\n\nb", "c"]
    with pytest.raises(NodeError, match="field_key 'value' is not a field"):
        node("ConversationToParagraph", input_col="conversation", output_col="t", field_key="value").output_schema(table.schema)
    with pytest.raises(NodeError, match="must be a list"):
        node("ConversationToParagraph", input_col="c", output_col="t").output_schema(pa.schema([("c", pa.string())]))


def test_conversation_to_paragraph_through_ray(run_pipeline, sample_dir, tmp_path):
    src = sample_dir / "pcmind_kaiyuan_2b_sample.lance"
    out = tmp_path / "conv.lance"
    cfg = {"pipeline": {"type": "LanceWriter", "output_path": str(out), "child_configs": [{
        "type": "ConversationToParagraph", "input_col": "conversation", "output_col": "paragraph",
        "child_configs": [{"type": "LanceReader", "input_path": str(src), "select_cols": ["id", "conversation"], "num_parallel": 3}]}]}}
    run_pipeline(cfg)
    written = read_lance(out)
    assert written.schema.field("paragraph").type == pa.string()
    for row in written.to_pylist():
        assert row["paragraph"] == "\n\n".join(turn["content"] for turn in row["conversation"])
        assert row["paragraph"].startswith("Question 0: ")  # never a repr of an array


# -- ParseJsonString ----------------------------------------------------------


def test_parse_json_with_schema_without_schema_and_flatten():
    table = pa.table({"j": ['{"title": "A", "tags": ["x", "y"], "meta": {"score": 0.5}, "extra": 1}', None, '{"title": 7}', "  "]})
    typed = node("ParseJsonString", input_col="j", output_col="p", schema="title STRING, tags ARRAY<STRING>, meta STRUCT<score: DOUBLE>")
    out = typed.transform(table)
    assert out.column("p").to_pylist() == [
        {"title": "A", "tags": ["x", "y"], "meta": {"score": 0.5}}, None, {"title": "7", "tags": None, "meta": None}, None]
    assert typed.output_schema(table.schema).field("p").type == out.column("p").type
    untyped = node("ParseJsonString", input_col="j", output_col="p")
    assert untyped.transform(table).column("p").to_pylist()[0] == [
        ("title", "A"), ("tags", '["x", "y"]'), ("meta", '{"score": 0.5}'), ("extra", "1")]
    flat = node("ParseJsonString", input_col="j", schema={"title": "string", "extra": "int"}, flatten=True)
    assert flat.transform(table).select(["title", "extra"]).to_pylist()[0] == {"title": "A", "extra": 1}
    assert flat.output_schema(table.schema).names == ["j", "title", "extra"]


def test_parse_json_bad_input():
    bad = pa.table({"j": ['{"a": 1}', "{not json"]})
    with pytest.raises(NodeError, match=r"pipeline > ParseJsonString: row 1 .*cannot parse"):
        node("ParseJsonString", input_col="j", output_col="p").transform(bad)
    lenient = node("ParseJsonString", input_col="j", output_col="p", on_error="null")
    assert lenient.transform(bad).column("p").to_pylist() == [[("a", "1")], None]
    with pytest.raises(NodeError, match="expected an integer"):
        node("ParseJsonString", input_col="j", output_col="p", schema="a INT").transform(pa.table({"j": ['{"a": "x"}']}))
    from flows.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="schema: unknown type 'strng'"):
        parse_config({"pipeline": {"type": "ParseJsonString", "input_col": "j", "output_col": "p", "schema": "a STRNG",
                                   "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}})


# -- ChineseCleanAndFilter ----------------------------------------------------

PAGES = json.loads((FIXTURES / "zh_web_pages.json").read_text())


@pytest.mark.parametrize("page", PAGES, ids=[p["name"] for p in PAGES])
def test_chinese_cleaning_rules_on_realistic_pages(page):
    from tasks.text import clean_chinese_text

    out = clean_chinese_text(page["text"])
    for keep in page["must_keep"]:
        assert keep in out, f"lost {keep!r}:\n{out}"
    for drop in page["must_drop"]:
        assert drop not in out, f"kept {drop!r}:\n{out}"
    assert "  " not in out and "\n\n" not in out


@pytest.mark.parametrize("raw, expected", [
    ("<p>正文内容很重要</p><script>var a=1;</script>", "正文内容很重要"),
    ("详见 https://www.gov.cn/zhengce/2023/content_123.htm 。", "详见 。"),
    ("联系邮箱 admin@example.com.cn 谢谢", "联系邮箱 谢谢"),
    ("![示意图](https://img.cn/a.png)图中展示了流程", "图中展示了流程"),
    ("第 3 页 共 10 页 正文继续", "正文继续"),
    ("当前位置：首页 > 教育 > 高考\n高考改革方案公布", "高考改革方案公布"),
    ("设为首页 | 加入收藏 | 网站地图\n文章内容", "文章内容"),
    ("Copyright © 2008-2023 新浪公司 版权所有\n内容", "内容"),
    ("（记者 李华）本报讯 市场持续回暖", "市场持续回暖"),
    ("新华社北京3月5日电 政府工作报告指出", "政府工作报告指出"),
    ("更新时间：2024年1月2日 08:00 天气晴朗", "天气晴朗"),
    ("【视频】[微笑] 精彩回顾", "精彩回顾"),
    ("身份证号 110101199003071234 已隐去", "身份证号 已隐去"),
    ("★☆★ 好消息 ➤ 🎉🎉 开学了", "好消息 开学了"),
    ("正文第一段。\n微信号：abc_12345\n正文第二段。", "正文第一段。\n正文第二段。"),
    ("太好了啊啊啊啊啊啊！！！！！", "太好了啊啊啊！！！"),
    ("多余   空格\u3000\u3000和\n\n\n空行", "多余 空格 和\n空行"),
])
def test_each_rule_category(raw, expected):
    from tasks.text import clean_chinese_text

    assert clean_chinese_text(raw) == expected


def test_spam_gate_probabilities_and_block_independence():
    from tasks.text import spam_keep_probability

    assert spam_keep_probability("加微信 wx12345678 了解更多") == 0.05
    assert spam_keep_probability("专业治疗牛皮癣，祖传秘方，免费咨询") == 0.05
    assert spam_keep_probability("关注我们的公众号，回复“资料”领取") == 0.05
    assert spam_keep_probability("夏季减肥瘦身小妙招，三天见效") == 0.1
    assert spam_keep_probability("北京今天天气晴朗，适合户外活动。") == 1.0

    spam = [f"第{i}期：专业治疗牛皮癣，祖传秘方，效果显著，欢迎来访。编号{i}号" for i in range(3000)]
    promo = [f"第{i}期：夏季减肥瘦身小妙招，坚持锻炼与健康饮食最重要。编号{i}号" for i in range(3000)]
    normal = [f"第{i}期：北京今天天气晴朗，适合户外活动，市民纷纷出游。编号{i}号" for i in range(500)]
    table = pa.table({"text": spam + promo + normal, "i": list(range(6500))})
    n = node("ChineseCleanAndFilter", seed=7)
    whole = n.transform(table)
    kept = set(whole.column("i").to_pylist())
    spam_kept = sum(1 for i in kept if i < 3000)
    promo_kept = sum(1 for i in kept if 3000 <= i < 6000)
    assert 90 <= spam_kept <= 220  # ~5% of 3000
    assert 210 <= promo_kept <= 400  # ~10% of 3000
    assert all(i in kept for i in range(6000, 6500))
    # same rows kept whatever the block layout, different seed -> different draw
    pieces = [n.transform(table.slice(s, 700)) for s in range(0, table.num_rows, 700)]
    assert sorted(i for p in pieces for i in p.column("i").to_pylist()) == sorted(kept)
    other = set(node("ChineseCleanAndFilter", seed=8).transform(table).column("i").to_pylist())
    assert other != kept


def test_chinese_clean_bad_input():
    n = node("ChineseCleanAndFilter", min_length=5)
    table = pa.table({"text": [None, "", "   ", "短文本", "这是一段足够长的正常中文文本。"]})
    out = n.transform(table)
    assert out.column("clean_text").to_pylist() == ["这是一段足够长的正常中文文本。"]
    raw = pa.table({"text": pa.array([b"\xe6\xad\xa3\xe5\xb8\xb8\xe4\xb8\xad\xe6\x96\x87\xff\xfe\xe5\x86\x85\xe5\xae\xb9\xe5\xbe\x88\xe9\x95\xbf\xe5\xbe\x88\xe9\x95\xbf"], pa.binary())})
    decoded = n.transform(raw).column("clean_text").to_pylist()
    assert decoded == ["正常中文 内容很长很长"]  # invalid bytes replaced, then removed as stray symbols
    with pytest.raises(NodeError, match="pipeline > ChineseCleanAndFilter: input_col: no column 'text'"):
        n.output_schema(pa.schema([("body", pa.string())]))
    with pytest.raises(NodeError, match="must be text"):
        n.transform(pa.table({"text": [1, 2]}))


def test_clean_zh_through_ray_is_reproducible_across_block_counts(run_pipeline, sample_dir, tmp_path):
    src = sample_dir / "fineweb_chinese.lance"
    results = []
    for blocks in (1, 5):
        out = tmp_path / f"clean_{blocks}.lance"
        cfg = {"pipeline": {"type": "LanceWriter", "output_path": str(out), "child_configs": [{
            "type": "ChineseCleanAndFilter", "seed": 3,
            "child_configs": [{"type": "LanceReader", "input_path": str(src), "num_parallel": blocks}]}]}}
        run_pipeline(cfg)
        results.append(read_lance(out).sort_by("id"))
    a, b = results
    assert a.equals(b)
    original = read_lance(src)
    assert 0 < a.num_rows < original.num_rows
    texts = a.column("clean_text").to_pylist()
    assert all(len(t) >= 10 for t in texts)
    joined = "\n".join(texts)
    for gone in ("<div", "http", "版权所有", "责任编辑", "上一页", "首页 >", "发布时间", "哈哈哈哈", "![", "公众号"):
        assert gone not in joined
