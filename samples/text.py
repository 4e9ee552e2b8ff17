"""Deterministic web-like text shared by the sample datasets and the sample
models: English and Chinese word lists, and documents made of pooled random
sentences."""

from __future__ import annotations

import numpy as np

EN_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can about what up out them "
    "some time could into only other new these two may then do first any now my such like our over man also did "
    "model data training language text quality web page article research study results method system learning "
    "network energy water climate city history market company government policy health school student teacher "
    "science physics chemistry biology math equation theory experiment analysis report public private local "
    "global economic social cultural political digital software hardware computer internet mobile device user "
    "customer product service price value growth rate level information process design development project "
    "community family children people world country state nation region area river mountain ocean island forest "
    "animal plant food farm industry factory engine power light sound music art film book story author reader "
    "question answer problem solution example evidence argument reason result effect cause change increase "
    "decrease improve reduce support provide require include describe explain discuss compare measure observe"
).split()

ZH_WORDS = (
    "我们 你们 他们 今天 明天 中国 北京 上海 学生 老师 学校 公司 市场 经济 发展 社会 文化 历史 科学 技术 "
    "研究 数据 模型 语言 文本 质量 网络 信息 系统 方法 结果 问题 答案 分析 报告 政府 政策 健康 教育 城市 "
    "农村 环境 能源 气候 人工智能 计算机 软件 手机 用户 产品 服务 价格 增长 提高 减少 支持 提供 需要 包括 "
    "描述 解释 讨论 比较 测量 观察 重要 主要 基本 一般 特别 非常 已经 正在 可以 应该 能够 通过 根据 关于 "
    "因为 所以 但是 而且 如果 虽然 然后 同时 以及 或者 的 了 在 是 有 和 就 不 也 都 这 那 个 上 下 中 大 小"
).split()

def _sentence_pool(rng: np.random.Generator, words: list[str], n: int, sep: str, end: str) -> list[str]:
    lengths = rng.integers(6, 22, size=n)
    idx = rng.integers(0, len(words), size=int(lengths.sum()))
    pool, pos = [], 0
    for length in lengths:
        toks = [words[i] for i in idx[pos : pos + length]]
        pos += length
        text = sep.join(toks)
        pool.append((text[0].upper() + text[1:] if sep == " " else text) + end)
    return pool


class TextMaker:
    """Documents as random runs of pooled sentences: cheap at millions of rows,
    varied enough that unrelated documents share few 5-gram shingles."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.en = _sentence_pool(rng, EN_WORDS, 20000, " ", ".")
        self.zh = _sentence_pool(rng, ZH_WORDS, 8000, "", "。")

    def docs(self, rng: np.random.Generator, n: int, lang: str, min_s: int = 2, max_s: int = 14) -> list[str]:
        pool = self.en if lang == "en" else self.zh
        sep = " " if lang == "en" else ""
        counts = rng.integers(min_s, max_s, size=n)
        picks = rng.integers(0, len(pool), size=int(counts.sum()))
        out, pos = [], 0
        for c in counts:
            out.append(sep.join(pool[i] for i in picks[pos : pos + c]))
            pos += c
        return out


def near_duplicate(rng: np.random.Generator, text: str, edits: int) -> str:
    words = text.split(" ")
    for _ in range(edits):
        i = int(rng.integers(0, len(words)))
        words[i] = EN_WORDS[int(rng.integers(0, len(EN_WORDS)))]
    return " ".join(words)
