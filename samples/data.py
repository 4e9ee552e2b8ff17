"""Deterministic sample data (no downloads): English and Chinese web-like
text, planted near-duplicates, quality scores with ties, token-id lists and
conversations as list<struct>.

    python -m samples.data                 # ~10k rows per dataset in data/sample
    python -m samples.data --rows 1000000 --out data/bench

Generation is chunked (100k rows at a time) so memory stays flat at any size.
The sample models (samples.models) are built next to the data when their
libraries are installed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from typing import Iterator

import numpy as np
import pyarrow as pa

from samples.models import build_all as build_models
from samples.text import TextMaker, near_duplicate

ZH_SPAM = [
    "加微信 wx{num} 了解更多优惠",
    "专业治疗牛皮癣 祖传秘方 咨询QQ：{num}",
    "关注我们的微信公众号，获取最新资讯",
    "美容整形 医院 特价 丰胸 减肥 联系电话 1{num}",
]
ZH_BOILERPLATE = [
    "首页 > 新闻中心 > 正文",
    "版权所有 © 2023 某某网 All Rights Reserved",
    "责任编辑：张三 来源：新华网",
    "发布时间：2023-05-01 12:30:45",
    "上一页 1 2 3 下一页",
    "点击这里查看原文 http://www.example.com/news/{num}.html",
    "【图片】![图片](http://img.example.com/{num}.jpg)",
    "<div class=\"content\">",
    "哈哈哈哈哈哈哈哈！！！！！",
]
SOURCES = ["dclm", "fineweb_edu", "wiki", "code", "math", "books"]


CONVERSATION_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
METADATA_TYPE = pa.struct([("url", pa.string()), ("score", pa.float64()), ("timestamp", pa.string())])


def main_chunk(maker: TextMaker, rng: np.random.Generator, start: int, n: int) -> pa.Table:
    """The general-purpose sample: every column family the nodes touch."""
    lang = np.where(rng.random(n) < 0.8, "en", "zh")
    n_zh = int((lang == "zh").sum())
    en_docs, zh_docs = iter(maker.docs(rng, n - n_zh, "en")), iter(maker.docs(rng, n_zh, "zh"))
    texts = [next(en_docs) if l == "en" else next(zh_docs) for l in lang]
    # Plant near-duplicates: ~5% of rows copy an earlier row of this chunk.
    for i in np.flatnonzero(rng.random(n) < 0.05):
        if i > 0 and lang[i] == "en":
            j = int(rng.integers(0, i))
            if lang[j] == "en":
                texts[i] = near_duplicate(rng, texts[j], int(rng.integers(0, 3)))
    fasttext = np.round(rng.beta(2, 5, size=n), 3)  # rounded: realistic ties
    score = np.round(rng.normal(0, 1, size=n), 2)
    token_lengths = np.array([max(1, len(t) // 4) for t in texts])
    token_ids = rng.integers(0, 32000, size=int(token_lengths.sum()), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(token_lengths)]).astype(np.int32)
    conv = []
    for k in rng.integers(1, 4, size=n):
        turns = []
        for t in range(int(k)):
            turns.append({"role": "user", "content": f"Question {t}: " + maker.en[int(rng.integers(0, len(maker.en)))]})
            turns.append({"role": "assistant", "content": maker.en[int(rng.integers(0, len(maker.en)))]})
        conv.append(turns)
    ids = np.arange(start, start + n, dtype=np.int64)
    metadata = [
        {"url": f"https://example.org/{SOURCES[i % len(SOURCES)]}/{i}", "score": float(s), "timestamp": f"2024-{(i % 12) + 1:02d}-01"}
        for i, s in zip(ids.tolist(), fasttext.tolist())
    ]
    return pa.table(
        {
            "id": ids,
            "text": pa.array(texts, pa.string()),
            "lang": pa.array(lang.tolist(), pa.string()),
            "source": pa.array([SOURCES[i] for i in rng.integers(0, len(SOURCES), size=n)], pa.string()),
            "fasttext_score": fasttext,
            "score": score,
            "duplicate_count": np.ones(n),
            "text_tokenized": pa.ListArray.from_arrays(offsets, token_ids),
            "conversation": pa.array(conv, CONVERSATION_TYPE),
            "metadata": pa.array(metadata, METADATA_TYPE),
        }
    )


def scored_chunk(maker: TextMaker, rng: np.random.Generator, start: int, n: int) -> pa.Table:
    texts = maker.docs(rng, n, "en")
    return pa.table(
        {
            "id": np.arange(start, start + n, dtype=np.int64),
            "text": pa.array(texts, pa.string()),
            "fasttext_score": np.round(rng.beta(2, 5, size=n), 2),  # heavy ties
            "score": np.round(rng.normal(0, 1, size=n), 3),
            "dclm_score": rng.random(n),
            "edu_score": rng.integers(0, 6, size=n).astype(np.float64),  # 6 values only
            "token_count": np.array([len(t) // 4 for t in texts], dtype=np.int64),
        }
    )


def chinese_chunk(maker: TextMaker, rng: np.random.Generator, start: int, n: int) -> pa.Table:
    body = maker.docs(rng, n, "zh", 1, 8)
    texts = []
    for i, doc in enumerate(body):
        lines = [doc]
        r = rng.random()
        if r < 0.25:
            lines.insert(0, ZH_BOILERPLATE[int(rng.integers(0, len(ZH_BOILERPLATE)))].format(num=int(rng.integers(10**7, 10**9))))
        if r < 0.1:
            lines.append(ZH_SPAM[int(rng.integers(0, len(ZH_SPAM)))].format(num=int(rng.integers(10**7, 10**9))))
        if rng.random() < 0.02:
            lines = ["短"]  # too short after cleaning
        texts.append("\n".join(lines))
    texts = [t if rng.random() > 0.01 else None for t in texts]
    return pa.table(
        {
            "id": np.arange(start, start + n, dtype=np.int64),
            "text": pa.array(texts, pa.string()),
            "url": pa.array([f"https://news.example.cn/{start + i}.html" for i in range(n)], pa.string()),
        }
    )


def dclm_chunk(maker: TextMaker, rng: np.random.Generator, start: int, n: int, with_counts: bool) -> pa.Table:
    texts = maker.docs(rng, n, "en", 4, 16)
    # ~10% near-duplicate clusters of 2-4 members with 0-4 word edits.
    for i in np.flatnonzero(rng.random(n) < 0.1):
        for k in range(1, int(rng.integers(2, 5))):
            if i + k < n:
                texts[i + k] = near_duplicate(rng, texts[i], int(rng.integers(0, 5)))
    cols = {
        "id": np.arange(start, start + n, dtype=np.int64),
        "text": pa.array(texts, pa.string()),
        "url": pa.array([f"https://dclm.example.com/{start + i}" for i in range(n)], pa.string()),
        "fasttext_score": np.round(rng.beta(2, 5, size=n), 3),
    }
    if with_counts:
        cols["duplicate_count"] = rng.integers(1, 8, size=n).astype(np.float64)
    return pa.table(cols)


def write_lance(path: str, chunks: Iterator[pa.Table]) -> None:
    """Write ``chunks`` as one Lance dataset at ``path``; readers never see a
    half-written one (it is written beside, then renamed)."""
    import lance

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    first = True
    for chunk in chunks:
        lance.write_dataset(chunk, tmp, mode="create" if first else "append", max_rows_per_file=200_000)
        first = False
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def chunks(fn, maker: TextMaker, seed: int, rows: int, chunk: int = 100_000, **kw) -> Iterator[pa.Table]:
    """``rows`` rows of the dataset made by ``fn`` (e.g. ``scored_chunk``),
    ``chunk`` at a time; the same seed gives the same rows."""
    for i, start in enumerate(range(0, rows, chunk)):
        rng = np.random.default_rng([seed, i])
        yield fn(maker, rng, start, min(chunk, rows - start), **kw)


DATASETS = {
    "pcmind_kaiyuan_2b_sample.lance": (main_chunk, {}),
    "scored_input.lance": (scored_chunk, {}),
    "fineweb_chinese.lance": (chinese_chunk, {}),
    "dclm_subset.lance": (dclm_chunk, {"with_counts": False}),
    "dclm_subset_dedup.lance": (dclm_chunk, {"with_counts": True}),
}


def generate_all(out_dir: str = "data/sample", rows: int = 10_000, seed: int = 0, only: list[str] | None = None) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    maker = TextMaker(seed)
    written = []
    for k, (name, (fn, kw)) in enumerate(DATASETS.items()):
        if only and name not in only:
            continue
        path = os.path.join(out_dir, name)
        write_lance(path, chunks(fn, maker, seed * 100 + k, rows, **kw))
        written.append(path)
    build_models(out_dir, seed=seed)  # each model only when its library is installed
    return written


@contextlib.contextmanager
def _exclusive(out_dir: str):
    """One generator per directory at a time (concurrent CLI runs, parallel
    test workers): the others wait, then find the data there."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


_COMPLETE = ".complete"  # written last: datasets and models are all there


def sample_complete(out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, _COMPLETE)) and all(os.path.exists(os.path.join(out_dir, n)) for n in DATASETS)


def ensure_sample_data(out_dir: str = "data/sample") -> bool:
    """Generate the default sample data (and models) unless present; True if generated."""
    with _exclusive(out_dir):
        if sample_complete(out_dir):
            return False
        generate_all(out_dir)
        with open(os.path.join(out_dir, _COMPLETE), "w") as f:
            f.write("generated by samples/data.py\n")
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="dataset file names to generate")
    args = parser.parse_args()
    for path in generate_all(args.out, args.rows, args.seed, args.only):
        print(path)


if __name__ == "__main__":
    main()
