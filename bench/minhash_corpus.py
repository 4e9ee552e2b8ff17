"""A generated corpus with planted near-duplicate clusters at controlled
Jaccard similarities, and exact ground truth (shared by tests/test_minhash.py
and bench/minhash_bench.py).

Documents are lowercase ASCII words separated by spaces, so the MinHash node's
normalisation is the identity and its tokens are the words: the exact shingle
Jaccard of two documents is computed here by brute force on word 5-grams.

A planted cluster is a base document plus variants; a variant replaces m
tokens at positions at least ``ngram`` apart with fresh words, which changes
exactly ``ngram * m`` of the base's S shingles, so J(base, variant) =
(S - n m) / (S + n m) is controlled by m.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def vocabulary(size: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    n = size * 2
    letters = rng.integers(97, 123, size=(n, 8), dtype=np.uint8)
    lengths = rng.integers(3, 9, size=n)
    words = sorted({bytes(row[:k]).decode() for row, k in zip(letters, lengths)})
    return list(np.array(words)[np.random.default_rng(seed + 1).permutation(len(words))][:size])


def _variant(rng, base: np.ndarray, target_j: float, ngram: int, vocab_size: int) -> np.ndarray:
    s = len(base) - ngram + 1
    m = int(round(s * (1 - target_j) / (ngram * (1 + target_j))))
    slots = np.arange(ngram - 1, len(base) - ngram + 1, ngram)  # interior, spaced by ngram
    m = min(m, len(slots))
    out = base.copy()
    if m:
        pos = rng.choice(slots, size=m, replace=False)
        out[pos] = rng.integers(0, vocab_size, size=m)
    return out


def make_corpus(
    n_docs: int,
    seed: int = 0,
    cluster_fraction: float = 0.3,
    min_tokens: int = 60,
    max_tokens: int = 240,
    ngram: int = 5,
    vocab_size: int = 50_000,
    j_low: float = 0.82,
    j_high: float = 1.0,
    low_fraction: float = 0.1,
    low_range: tuple[float, float] = (0.3, 0.6),
    start_id: int = 0,
) -> pa.Table:
    """Columns: id (int64), text, cluster (planted cluster id, -1 for none).
    A variant's Jaccard to its base is drawn uniformly in [j_low, j_high];
    ``low_fraction`` of the variants are far (``low_range``: they should
    rarely be removed) and 5% are exact copies of the text; rows shuffled."""
    rng = np.random.default_rng(seed)
    vocab = np.array(vocabulary(vocab_size), dtype=object)
    docs: list[np.ndarray] = []
    cluster: list[int] = []
    cid = 0
    n_clustered = int(n_docs * cluster_fraction)
    while len(docs) < n_clustered:
        size = int(rng.integers(2, 7))
        base = rng.integers(0, vocab_size, size=int(rng.integers(min_tokens, max_tokens)))
        docs.append(base)
        cluster.append(cid)
        for _ in range(size - 1):
            u = rng.random()
            if u < 0.05:
                j = 1.0
            elif u < 0.05 + low_fraction:
                j = float(rng.uniform(*low_range))
            else:
                j = float(rng.uniform(j_low, j_high))
            docs.append(_variant(rng, base, j, ngram, vocab_size))
            cluster.append(cid)
        cid += 1
    while len(docs) < n_docs:
        docs.append(rng.integers(0, vocab_size, size=int(rng.integers(min_tokens, max_tokens))))
        cluster.append(-1)
    docs, cluster = docs[:n_docs], cluster[:n_docs]
    order = rng.permutation(n_docs)
    cl = np.array(cluster, dtype=np.int64)[order]
    return pa.table(
        {
            "id": np.arange(start_id, start_id + n_docs, dtype=np.int64),
            "text": pa.array([" ".join(vocab[docs[i]]) for i in order], pa.string()),
            "cluster": np.where(cl >= 0, cl + start_id, -1),
        }
    )


def shingles(text: str, ngram: int = 5) -> set:
    toks = text.split()
    if len(toks) < ngram:
        return {tuple(toks)}
    return {tuple(toks[i : i + ngram]) for i in range(len(toks) - ngram + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def ground_truth_pairs(table: pa.Table, n_random: int = 20_000, seed: int = 1, ngram: int = 5):
    """Exact Jaccard for every pair inside a planted cluster plus random pairs:
    list of (id_a, id_b, jaccard)."""
    ids = table.column("id").to_numpy()
    texts = table.column("text").to_pylist()
    clusters = table.column("cluster").to_numpy()
    sh = {}

    def get(i):
        if i not in sh:
            sh[i] = shingles(texts[i], ngram)
        return sh[i]

    pairs = []
    order = np.argsort(clusters, kind="stable")
    cs = clusters[order]
    starts = np.flatnonzero(np.concatenate(([True], cs[1:] != cs[:-1])))
    ends = np.append(starts[1:], len(cs))
    for s, e in zip(starts, ends):
        if cs[s] < 0:
            continue
        members = order[s:e]
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = int(members[x]), int(members[y])
                pairs.append((int(ids[i]), int(ids[j]), jaccard(get(i), get(j))))
    rng = np.random.default_rng(seed)
    for i, j in rng.integers(0, len(ids), size=(n_random, 2)):
        if i != j:
            pairs.append((int(ids[i]), int(ids[j]), jaccard(shingles(texts[i], ngram), shingles(texts[j], ngram))))
    return pairs


def evaluate(table: pa.Table, label_of: dict, removed_ids: set, pairs, ngram: int = 5) -> dict:
    """Recall over pairs with J >= 0.8 (both in one predicted cluster), and
    the share of removed documents with no partner of J >= 0.5 (searched in
    their predicted cluster: a conservative count). ``label_of``: id ->
    predicted cluster label for every document."""
    hi = [(a, b) for a, b, j in pairs if j >= 0.8]
    found = sum(1 for a, b in hi if label_of[a] == label_of[b])
    texts = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    members: dict = {}
    for i, lab in label_of.items():
        members.setdefault(lab, []).append(i)
    lonely = 0
    for ids in members.values():
        if len(ids) < 2:
            continue
        sh = {i: shingles(texts[i], ngram) for i in ids}
        for i in ids:
            if i in removed_ids and max(jaccard(sh[i], sh[o]) for o in ids if o != i) < 0.5:
                lonely += 1
    removed = len(removed_ids)
    return {
        "pairs_j_ge_0_8": len(hi),
        "recall_j_ge_0_8": found / len(hi) if hi else 1.0,
        "removed": removed,
        "removed_without_partner_j_ge_0_5": lonely,
        "false_removal_rate": lonely / removed if removed else 0.0,
    }
