"""MinHash near-duplicate removal (SPEC §9), distributed end to end.

Stages (every one runs in Ray tasks; the driver only sees scalars and
per-block summaries, so its memory stays flat as the input grows):

1. **prep** — drop null/blank texts, add ``duplicate_count`` (1.0), decode
   non-UTF-8 bytes, and give every row a *content key*: a 64-bit hash of all
   its columns. The key does not depend on block layout, so everything that
   follows (survivor choice included) is the same whatever the block count.
   The prepped rows are materialized once in Ray's object store, then
   regrouped into as many blocks as the shuffles have partitions.
2. **signatures** — normalise (NFKD + strip diacritics, lowercase, digit runs
   to ``0``, punctuation/control to space), tokenise (``en``: non-word
   characters; ``zh``: jieba), hash tokens and ``ngram_size`` shingles to 64
   bits and take ``num_permutations`` universal permutations modulo 2^61-1,
   all in one numba kernel over the Arrow buffers (no per-shingle Python).
   The band hashes (b bands of r rows, chosen to minimise FP+FN) are written
   to a Lance checkpoint under ``<work_dir>/minhash/<fingerprint>/``, keyed by
   the input's content fingerprint and the parameters: a rerun after an
   interruption reads them back instead of recomputing. Each run writes its
   own dataset and publishes it only once verified (``SignatureCheckpoint``).
3. **buckets** — (band bucket, key) rows grouped by a Ray Data sort shuffle on
   the bucket hash; each bucket links its members to its smallest key.
4. **connected components** — alternating large-star / small-star rounds
   (Kiveris et al., 2014), each a Ray Data shuffle of the edge list, until no
   edge changes; every component ends as a star around its minimum key.
5. **clusters** — keys joined with their component label (shuffle on key),
   then per-cluster sums of ``duplicate_count`` (shuffle on label).
6. **survivors** — the prepped rows co-grouped with the cluster table by key
   (shuffle): the row whose key is its cluster's minimum survives with the
   summed ``duplicate_count``; the others are dropped. Rows too short to
   shingle pass through untouched.

All shuffles are sort-based with fixed, evenly spaced boundaries over the
uniformly distributed 64-bit keys (Ray's hash-shuffle strategies carry seconds
of fixed cost per shuffle here). Their width follows the prepped row count and
bytes (``shuffle_parts``), with ``num_parallel`` as the upper bound.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import Field

from tasks.base import Node, NodeError, NodeParams, Observation, Report, RunContext, Stream, name_errors, register
from tasks.checkpoints import Checkpoint, Incomplete, write_lance
from tasks.hashing import U64, binary_buffers, content_keys, to_array

log = logging.getLogger("kaiyuan.minhash")

MERSENNE61 = (1 << 61) - 1
KEY = "_mh_key"
DC = "duplicate_count"
CODE_VERSION = "minhash-v1"  # bump when signatures/bands change meaning

# ---------------------------------------------------------------------------
# Parameters


class MinHashParams(NodeParams):
    # Each document carries num_permutations 64-bit values through the
    # shuffles: 4096 is 32 KB a document, already far past any recipe (128).
    num_permutations: int = Field(ge=2, le=4096)
    threshold: float = Field(gt=0.0, lt=1.0)
    num_parallel: int = Field(ge=1, le=1_000_000)  # an upper bound; shuffles are sized by the data
    language: Literal["en", "zh"] = "en"
    input_col_name: str = "text"
    seed: int = Field(default=1234, ge=0, le=2**32 - 1)  # numpy's seed range
    ngram_size: int = Field(default=5, ge=1, le=64)
    min_length: int = Field(default=5, ge=0, le=1_000_000)


def _integrate(f, a: float, b: float, n: int = 2001) -> float:
    if b <= a:
        return 0.0
    xs = np.linspace(a, b, n)
    ys = f(xs)
    return float(np.sum((ys[1:] + ys[:-1]) * 0.5 * np.diff(xs)))


def fp_probability(threshold: float, b: int, r: int) -> float:
    """Weighted false-positive area: P(candidate) integrated below the threshold."""
    return _integrate(lambda s: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)


def fn_probability(threshold: float, b: int, r: int) -> float:
    """False-negative area: P(not candidate) integrated above the threshold."""
    return _integrate(lambda s: 1 - (1 - (1 - s ** float(r)) ** float(b)), threshold, 1.0)


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(b, r) with b*r <= num_perm minimising the weighted FP + FN probability."""
    best, opt = float("inf"), (1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = fp_weight * fp_probability(threshold, b, r) + fn_weight * fn_probability(threshold, b, r)
            if err < best:
                best, opt = err, (b, r)
    return opt


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Universal hash parameters (a, b) modulo 2^61-1, seeded."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE61, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE61, size=num_perm, dtype=np.uint64)
    return a, b


# ---------------------------------------------------------------------------
# Kernels (numba; compiled once per worker process, cached on disk)

def _kernels():
    """The numba kernels (imported lazily: numba is slow to import)."""
    from tasks import _minhash_kernels

    return _minhash_kernels.KERNELS


def as_text(arr, node_path: str, col: str) -> pa.Array:
    """The text column as a valid UTF-8 string array (bad bytes replaced)."""
    arr = to_array(arr)
    t = arr.type
    if pa.types.is_large_string(t) or pa.types.is_string(t):
        try:
            arr.validate(full=True)
            return arr
        except pa.ArrowInvalid:
            arr = arr.view(pa.large_binary() if pa.types.is_large_string(t) else pa.binary())
            t = arr.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            return arr.cast(pa.large_string() if pa.types.is_large_binary(t) else pa.string())
        except pa.ArrowInvalid:
            return pa.array(
                [None if v is None else v.decode("utf-8", "replace") for v in arr.to_pylist()],
                pa.large_string(),
            )
    raise NodeError(node_path, f"input_col_name {col!r} must be a string column, got {t}")


_JIEBA = None


def _jieba():
    global _JIEBA
    if _JIEBA is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _JIEBA = jieba
    return _JIEBA


def normalise(arr: pa.Array, language: str) -> pa.Array:
    """SPEC §9.2-3 as Arrow kernels: NFKD + strip diacritics, lowercase, digit
    runs -> 0, punctuation/control (and, for en, every non-word character) ->
    space. The result separates tokens by spaces (for zh, jieba's words)."""
    s = pc.utf8_normalize(arr, "NFKD")
    s = pc.replace_substring_regex(s, r"\p{Mn}+", "")  # strip diacritics
    s = pc.utf8_lower(s)
    s = pc.replace_substring_regex(s, r"\p{Nd}+", "0")  # digit runs -> 0
    if language == "en":
        s = pc.replace_substring_regex(s, r"[^\p{L}\p{N}\p{M}_]+", " ")
    else:
        s = pc.replace_substring_regex(s, r"[\p{P}\p{C}\p{Z}\s]+", " ")
        jieba = _jieba()
        s = pa.array(
            [None if doc is None else " ".join(t for t in jieba.cut(doc, HMM=True) if not t.isspace()) for doc in s.to_pylist()],
            pa.large_string(),
        )
    return to_array(s)


def kernel_input(texts: pa.Array, language: str) -> pa.Array:
    """What the signature kernel tokenises: ASCII rows of ``en`` text as they
    are (the kernel normalises ASCII itself, identically), every other row
    normalised by ``normalise``."""
    texts = to_array(texts)
    if language != "en" or len(texts) == 0:
        return normalise(texts, language)
    ascii_ = pc.fill_null(pc.string_is_ascii(texts), True)
    if pc.all(ascii_).as_py():
        return texts
    idx = pc.indices_nonzero(pc.invert(ascii_))
    fixed = normalise(texts.take(idx), language).cast(pa.large_string())
    out = texts.cast(pa.large_string())
    # scatter the normalised rows back in place
    mask = pc.invert(ascii_)
    return pc.replace_with_mask(out, mask, fixed)


def signature_matrix(texts: pa.Array, language: str, ngram: int, min_len: int, a: np.ndarray, b: np.ndarray):
    """(signatures uint64[n, num_perm], token counts int64[n])."""
    norm = kernel_input(texts, language)
    n = len(norm)
    sig = np.empty((n, len(a)), dtype=U64)
    ntok = np.zeros(n, dtype=np.int64)
    if n:
        offsets, data = binary_buffers(norm)
        _kernels()["signatures"](offsets, data, ngram, min_len, a, b, sig, ntok)
    return sig, ntok


def band_hashes(sig: np.ndarray, b: int, r: int) -> np.ndarray:
    out = np.empty((sig.shape[0], b), dtype=U64)
    if sig.shape[0]:
        _kernels()["bands"](sig, b, r, out)
    return out


# ---------------------------------------------------------------------------
# Distributed building blocks


# Shuffle width. A sort shuffle over p partitions moves p x p blocks, so a
# width taken from num_parallel alone costs O(num_parallel^2) blocks (and
# driver memory) whatever the input size. The width follows the data instead;
# num_parallel is only the upper bound.
MIN_ROWS_PER_PART = 1000  # fewer rows than this per task: fixed task costs dominate
MIN_ROWS_PER_BLOCK = 16  # rows / p^2: keeps the block count proportional to the rows
MAX_PART_BYTES = 128 << 20  # large documents: spread them out even when rows are few


def shuffle_parts(rows: int, cap: int, nbytes: int = 0) -> int:
    """Partitions for ``rows`` rows of ``nbytes`` bytes: in 1..min(cap, rows)."""
    by_rows = min(-(-rows // MIN_ROWS_PER_PART), math.isqrt(rows // max(1, MIN_ROWS_PER_BLOCK)))
    by_bytes = -(-nbytes // MAX_PART_BYTES)
    return max(1, min(cap, rows, max(by_rows, by_bytes)))


def _boundaries(parts: int) -> list[int]:
    """Evenly spaced int64 boundaries: keys are uniform 64-bit hashes."""
    if parts <= 1:
        return []
    edges = np.linspace(-(2.0**63), 2.0**63, parts + 1)[1:-1]
    return [int(x) for x in edges]


def _sort_shuffle(ds, key: str, parts: int):
    """Co-locate equal keys: a sort shuffle with fixed boundaries. Each output
    block holds whole key groups, sorted (what Ray's own map_groups relies on)."""
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    bounds = _boundaries(parts)
    if not bounds:
        return ds.repartition(1).sort(key)
    return ds.sort(key, boundaries=bounds)


def _map(ds, fn, node_path: str, batch_size: int | None = None):
    """map_batches over whole blocks (or batches of ``batch_size`` rows, small
    blocks bundled into one task up to that size); errors name the node."""
    return ds.map_batches(
        name_errors(node_path, fn),
        batch_format="pyarrow",
        batch_size=batch_size,
        zero_copy_batch=True,
    )


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values starts in a sorted array."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))


def _i64(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.int64)


EDGE_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])


def _edges_table(u: np.ndarray, v: np.ndarray, changed: int = 0) -> pa.Table:
    chg = np.zeros(len(u), dtype=np.int64)
    if len(u):
        chg[0] = changed
    return pa.table({"u": u.astype(np.int64), "v": v.astype(np.int64), "_chg": chg})


def bucket_edges(batch: pa.Table) -> pa.Table:
    """One block of (bucket, key) rows, whole buckets: link every distinct
    member of a bucket to the bucket's smallest key (star edges u > v)."""
    bk = batch.column("_bucket").to_numpy()
    k = batch.column(KEY).to_numpy()
    order = np.lexsort((k, bk))
    bk, k = bk[order], k[order]
    starts = _group_starts(bk)
    gid = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(bk))))
    mins = k[starts][gid]
    new = np.ones(len(k), dtype=bool)
    if len(k):
        new[1:] = (k[1:] != k[:-1]) | (bk[1:] != bk[:-1])
    keep = new & (k != mins)
    return _edges_table(k[keep], mins[keep])


def _directed(batch: pa.Table) -> pa.Table:
    u = batch.column("u").to_numpy()
    v = batch.column("v").to_numpy()
    return pa.table({"src": np.concatenate([u, v]), "dst": np.concatenate([v, u])})


def _sorted_groups(batch: pa.Table):
    src = batch.column("src").to_numpy()
    dst = batch.column("dst").to_numpy()
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    if len(src):  # drop duplicate directed edges
        uniq = np.ones(len(src), dtype=bool)
        uniq[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
        src, dst = src[uniq], dst[uniq]
    starts = _group_starts(src)
    gid = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(src))))
    return src, dst, starts, gid


def large_star(batch: pa.Table) -> pa.Table:
    """For each node u: m = min(N(u) + u); each larger neighbour v links to m."""
    src, dst, starts, gid = _sorted_groups(batch)
    if not len(src):
        return _edges_table(np.zeros(0, np.int64), np.zeros(0, np.int64))
    m = np.minimum(dst[starts], src[starts])[gid]  # dst sorted within group
    sel = dst > src
    changed = int(np.count_nonzero(sel & (m < src)))
    return _edges_table(dst[sel], m[sel], changed)


def small_star(batch: pa.Table) -> pa.Table:
    """For each node u with smaller neighbours N: m = min(N); every member of
    N + u other than m links to m."""
    src, dst, starts, gid = _sorted_groups(batch)
    sel = dst < src
    src, dst = src[sel], dst[sel]
    if not len(src):
        return _edges_table(np.zeros(0, np.int64), np.zeros(0, np.int64))
    starts = _group_starts(src)
    gid = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(src))))
    m = dst[starts]  # smallest smaller neighbour
    mm = m[gid]
    other = dst != mm
    u = np.concatenate([dst[other], src[starts]])
    v = np.concatenate([mm[other], m])
    changed = int(np.count_nonzero(other))
    return _edges_table(u, v, changed)


def _sum_column(ds, col: str) -> int:
    """Sum one int column on the cluster (per-block partial sums)."""
    total = 0
    for batch in ds.map_batches(
        lambda b: pa.table({"s": [int(pc.sum(b.column(col)).as_py() or 0)]}),
        batch_format="pyarrow",
        batch_size=None,
    ).iter_batches(batch_format="pyarrow", batch_size=None):
        total += int(pc.sum(batch.column("s")).as_py() or 0)
    return total


def connected_components(edges, parts: int, node_path: str = "MinHash", max_rounds: int = 200):
    """Large-star / small-star on an edge dataset (u, v int64). Returns
    (dataset of (u = vertex, v = component min) for every non-minimum vertex,
    number of rounds). Each step is one sort shuffle on the source vertex, at
    most ``parts`` wide and narrower when the edges are few."""
    cur = edges.select_columns(["u", "v"]).materialize()
    rounds = 0
    n_edges = cur.count()
    if n_edges == 0:
        return cur, rounds
    parts = shuffle_parts(2 * n_edges, parts)  # each step shuffles both directions
    while True:
        rounds += 1
        changed = 0
        for step in (large_star, small_star):
            nxt = _map(_sort_shuffle(_map(cur, _directed, node_path), "src", parts), step, node_path).materialize()
            changed += _sum_column(nxt, "_chg")
            cur = nxt.select_columns(["u", "v"])
        if changed == 0:
            break
        if rounds >= max_rounds:
            raise NodeError(node_path, f"connected components did not converge in {max_rounds} rounds")
    return cur.materialize(), rounds


# ---------------------------------------------------------------------------
# Per-stage batch functions (made by factories, so that a closure pickles
# the few values it needs, never the node)


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start


def _prep_fn(path: str, col: str, out_schema: pa.Schema):
    """Stage 1: drop null/blank texts, decode bad UTF-8, set duplicate_count,
    append the content key."""

    def prep(batch: pa.Table) -> pa.Table:
        text = as_text(batch.column(col), path, col)
        blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), True)
        keep = pc.invert(blank)
        batch = batch.set_column(batch.schema.get_field_index(col), col, text)
        batch = batch.filter(keep)
        if DC in batch.column_names:
            dc = pc.fill_null(batch.column(DC).cast(pa.float64()), 1.0)
            batch = batch.set_column(batch.schema.get_field_index(DC), DC, dc)
        else:
            batch = batch.append_column(DC, pa.array(np.ones(batch.num_rows), pa.float64()))
        batch = batch.select(out_schema.names).cast(out_schema)
        return batch.append_column(KEY, pa.array(_i64(content_keys(batch)), pa.int64()))

    return prep


def _sign_fn(p: MinHashParams, nb_: int, r: int):
    """Stage 2: signatures -> band hashes, with the short-document flag."""
    a, b = permutations(p.num_permutations, p.seed)
    col, lang, ngram, min_len = p.input_col_name, p.language, p.ngram_size, p.min_length

    def sign(batch: pa.Table) -> pa.Table:
        sig, ntok = signature_matrix(batch.column(col), lang, ngram, min_len, a, b)
        bh = band_hashes(sig, nb_, r)
        valid = ntok >= max(min_len, 1)
        flat = pa.array(_i64(bh).reshape(-1), pa.int64())
        return pa.table(
            {
                KEY: batch.column(KEY),
                DC: batch.column(DC),
                "_valid": pa.array(valid),
                "_bands": pa.FixedSizeListArray.from_arrays(flat, nb_),
            }
        )

    return sign


def _explode_fn(nb_: int):
    """Stage 3: one (bucket, key) row per band of every valid document."""

    def explode(batch: pa.Table) -> pa.Table:
        valid = batch.column("_valid").to_numpy(zero_copy_only=False)
        keys = batch.column(KEY).to_numpy()[valid]
        bands = to_array(batch.column("_bands")).flatten().to_numpy().reshape(-1, nb_)[valid]
        return pa.table({"_bucket": bands.reshape(-1), KEY: np.repeat(keys, nb_)})

    return explode


def _join_fns(out_schema: pa.Schema):
    """Stage 6: the two sides of the survivors' co-group (document rows, tag
    0; cluster rows, tag 1) and the function that keeps the survivors."""
    out_names = out_schema.names
    join_schema = JOIN_SCHEMA(out_schema.append(pa.field(KEY, pa.int64())))

    def left(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        return batch.append_column("_tag", pa.array(np.zeros(n, np.int8))).append_column(
            "_dcsum", pa.nulls(n, pa.float64())
        ).append_column("_keepall", pa.nulls(n, pa.bool_()))

    def right(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = {name: pa.nulls(n, out_schema.field(name).type) for name in out_names}
        cols[KEY] = batch.column("_label")
        cols["_tag"] = pa.array(np.ones(n, np.int8))
        cols["_dcsum"] = batch.column("_dcsum")
        cols["_keepall"] = batch.column("_keepall")
        return pa.table(cols, schema=join_schema)

    def survivors(batch: pa.Table) -> pa.Table:
        return _survivors(batch).select(out_names).cast(out_schema)

    return left, right, survivors


# ---------------------------------------------------------------------------
# The node


@dataclasses.dataclass
class DedupResult:
    """Handles to every stage (lazy datasets) and the counters of one run."""

    output: Any
    prepped: Any = None
    signatures: Any = None
    edges: Any = None
    labels: Any = None
    clusters: Any = None
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    resumed: bool = False
    checkpoint: str | None = None


@register
class MinHash(Node):
    """Near-duplicate removal by MinHash LSH with distributed connected components."""

    type_name = "MinHash"
    Params = MinHashParams
    requires = ("numba", "jieba")
    extra = "minhash"
    checkpoint_by_default = True  # the shuffles cost far more than reading the survivors back

    # -- schema -----------------------------------------------------------
    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        col = self.params.input_col_name
        if col not in schema.names:
            raise self.error(f"input_col_name {col!r} is not a column (columns: {', '.join(schema.names) or 'none'})")
        t = schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            raise self.error(f"input_col_name {col!r} must be a string column, got {t}")
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            schema = schema.set(schema.get_field_index(col), pa.field(col, pa.large_string()))
        if DC in schema.names:
            dt = schema.field(DC).type
            if not (pa.types.is_integer(dt) or pa.types.is_floating(dt)):
                raise self.error(f"{DC} must be numeric, got {dt}")
            return schema.set(schema.get_field_index(DC), pa.field(DC, pa.float64()))
        return schema.append(pa.field(DC, pa.float64()))

    def bands(self) -> tuple[int, int]:
        return optimal_bands(self.params.threshold, self.params.num_permutations)

    # -- execution --------------------------------------------------------
    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        result = self.run(stream, ctx)
        self.report_metrics(ctx, {f"minhash.{k}": float(v) for k, v in result.stats.items()})
        return Stream(self.tap(result.output, ctx), self.output_schema(stream.schema))

    def run(self, stream: Stream, ctx: RunContext) -> DedupResult:
        """Every stage; returns handles for tests and the bench."""
        out_schema = self.output_schema(stream.schema)
        nb_, r = self.bands()
        stats: dict[str, float] = {"bands": nb_, "rows": r}
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with _timed(timings, "prep"):
            prepped, n_docs, parts, summary = self._prep(stream, out_schema)
            stats.update(documents_considered=n_docs, partitions=parts)
        if n_docs == 0:
            stats.update(documents_out=0, clusters=0, largest_cluster=0, removed=0, short=0)
            empty = _map(prepped, lambda b: b.select(out_schema.names).cast(out_schema), self.path)
            return DedupResult(output=empty, prepped=prepped, stats=stats)
        with _timed(timings, "signatures"):
            sig_uri, sig, resumed = self._signatures(prepped, n_docs, parts, summary, stream.schema, ctx)
        with _timed(timings, "buckets"):
            edges = self._edges(sig, parts)
        with _timed(timings, "components"):
            labels, rounds = connected_components(edges, parts, self.path)
            stats["cc_rounds"] = rounds
        with _timed(timings, "clusters"):
            clusters = self._clusters(sig, labels, parts)
            csum = _cluster_summary(clusters)
            stats.update(csum)
            stats["documents_out"] = n_docs - csum["removed"]
        output = self._survivors(prepped, clusters, out_schema, parts)
        timings["total_before_output"] = time.perf_counter() - t0
        stats["short"] = float(csum.get("short", 0))
        log.info("%s: MinHash stages %s", self.path, {k: round(v, 2) for k, v in timings.items()})
        self.timings = timings
        return DedupResult(
            output=output,
            prepped=prepped,
            signatures=sig,
            edges=edges,
            labels=labels,
            clusters=clusters,
            stats=stats,
            resumed=resumed,
            checkpoint=sig_uri,
        )

    def _prep(self, stream: Stream, out_schema: pa.Schema):
        """Stage 1, materialized in the object store and regrouped into the
        shuffle width. Returns (rows, count, width, key digests)."""
        prep = _prep_fn(self.path, self.params.input_col_name, out_schema)
        # Batches bundle tiny upstream blocks into one task (a reader at
        # num_parallel 960 hands over 1-row blocks for 1,000 rows).
        prepped = _map(stream.ds, prep, self.path, batch_size=MIN_ROWS_PER_PART).materialize()
        n_docs = prepped.count()
        # The width is known only now that the rows are: regroup them into it
        # (upstream may hand over far more blocks than rows).
        parts = shuffle_parts(n_docs, max(1, self.params.num_parallel), prepped.size_bytes())
        if prepped.num_blocks() != parts:
            prepped = prepped.repartition(parts).materialize()
        return prepped, n_docs, parts, _block_summaries(prepped)

    def _signatures(self, prepped, n_docs: int, parts: int, summary: dict, schema: pa.Schema, ctx: RunContext):
        """Stage 2: band hashes per document, read back from the checkpoint of
        the same input and parameters when one is published. Returns (the
        checkpoint's URI, its dataset, whether it was reused)."""
        p = self.params
        # The run's work location takes the run's storage options (a node's
        # own options are for its input, possibly another store).
        so = dict(ctx.storage_options) or None
        base = _abs(f"{ctx.work_dir.rstrip('/')}/minhash/{self._fingerprint(summary, schema)}")
        ckpt = SignatureCheckpoint(base, so, self.path)
        found = ckpt.load(n_docs)
        resumed = found is not None
        if not resumed:
            nb_, r = self.bands()
            private = ckpt.private_uri()
            signed = _map(prepped.select_columns([p.input_col_name, DC, KEY]), _sign_fn(p, nb_, r), self.path)
            write_lance(signed, private, SIG_SCHEMA(nb_), so)
            found = ckpt.publish(private, n_docs, {"params": p.model_dump(), "bands": nb_, "band_rows": r})
        sig_uri, sig_version = found
        return sig_uri, _read_lance(sig_uri, sig_version, parts, so), resumed

    def _edges(self, sig, parts: int):
        """Stage 3: (band bucket, key) rows grouped by bucket -> star edges."""
        buckets = _map(sig, _explode_fn(self.bands()[0]), self.path)
        grouped = _sort_shuffle(buckets, "_bucket", parts)
        return _map(grouped, bucket_edges, self.path).select_columns(["u", "v"]).materialize()

    def _clusters(self, sig, labels, parts: int):
        """Stage 5: every key with its component label, then per-label sums."""
        slim = _map(sig, _slim_rows, self.path)
        lab = _map(labels, _label_rows, self.path)
        keyed = _map(_sort_shuffle(slim.union(lab), KEY, parts), _attach_labels, self.path)
        return _map(_sort_shuffle(keyed, "_label", parts), _cluster_sums, self.path).materialize()

    def _survivors(self, prepped, clusters, out_schema: pa.Schema, parts: int):
        """Stage 6 (lazy; executed by the consumer): the rows co-grouped with
        their cluster's row by key, one survivor kept per cluster."""
        left, right, survivors = _join_fns(out_schema)
        joined = _sort_shuffle(_map(prepped, left, self.path).union(_map(clusters, right, self.path)), KEY, parts)
        return _map(joined, survivors, self.path)

    def _fingerprint(self, summary: dict, schema: pa.Schema) -> str:
        p = self.params
        ident = {
            "code": CODE_VERSION,
            "rows": summary["rows"],
            "xor": summary["xor"],
            "sum": summary["sum"],
            "schema": str(schema),
            "params": {k: v for k, v in p.model_dump().items() if k != "num_parallel"},
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]

    # -- report -----------------------------------------------------------
    def report(self, observed: Observation) -> Report | None:
        s = {k[len("minhash.") :]: v for k, v in observed.sums.items() if k.startswith("minhash.")}
        if not s:
            return None
        b, r = self.bands()
        fp = fp_probability(self.params.threshold, b, r)
        fn = fn_probability(self.params.threshold, b, r)
        considered = int(s.get("documents_considered", 0))
        removed = int(s.get("removed", 0))
        rows = [
            ("documents in", observed.rows_in if observed.rows_in is not None else "–"),
            ("null/blank dropped", (observed.rows_in - considered) if observed.rows_in is not None else "–"),
            ("documents considered", considered),
            ("too short to shingle (kept)", int(s.get("short", 0))),
            ("documents out", observed.rows_out if observed.rows_out is not None else int(s.get("documents_out", 0))),
            ("duplicate clusters", int(s.get("clusters", 0))),
            ("largest cluster", int(s.get("largest_cluster", 0))),
            ("documents removed", removed),
            ("duplicate rate", f"{removed / considered:.4%}" if considered else "0%"),
            ("bands x rows", f"{b} x {r} (of {self.params.num_permutations} permutations)"),
            ("estimated false-positive probability (area below threshold)", f"{fp:.5f}"),
            ("estimated false-negative probability (area above threshold)", f"{fn:.5f}"),
            ("connected-component rounds", int(s.get("cc_rounds", 0))),
            ("shuffle partitions", f"{int(s.get('partitions', 0))} (num_parallel {self.params.num_parallel} at most)"),
        ]
        md = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        return Report(title="MinHash dedup report", markdown=md, table=[{"metric": k, "value": str(v)} for k, v in rows])


def SIG_SCHEMA(nb_: int) -> pa.Schema:
    return pa.schema(
        [(KEY, pa.int64()), (DC, pa.float64()), ("_valid", pa.bool_()), ("_bands", pa.list_(pa.int64(), nb_))]
    )


def JOIN_SCHEMA(keyed: pa.Schema) -> pa.Schema:
    return keyed.append(pa.field("_tag", pa.int8())).append(pa.field("_dcsum", pa.float64())).append(
        pa.field("_keepall", pa.bool_())
    )


def _slim_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table(
        {
            KEY: batch.column(KEY),
            "_label": pa.nulls(n, pa.int64()),
            DC: batch.column(DC),
            "_valid": batch.column("_valid"),
        }
    )


def _label_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table(
        {
            KEY: batch.column("u"),
            "_label": batch.column("v"),
            DC: pa.nulls(n, pa.float64()),
            "_valid": pa.nulls(n, pa.bool_()),
        }
    )


def _attach_labels(batch: pa.Table) -> pa.Table:
    """Rows of one key (document rows + at most one label row): every document
    row gets its component label (its own key when it has none)."""
    k = batch.column(KEY).to_numpy()
    lab_col = batch.column("_label")
    is_label = lab_col.is_valid().to_numpy(zero_copy_only=False)
    lab = lab_col.fill_null(0).to_numpy()
    order = np.lexsort((~is_label, k))  # label row first within a key
    k, lab, is_label = k[order], lab[order], is_label[order]
    starts = _group_starts(k)
    gid = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(k))))
    has = is_label[starts][gid]
    label = np.where(has, lab[starts][gid], k)
    docs = ~is_label
    dc = batch.column(DC).fill_null(0.0).to_numpy()[order]
    valid = batch.column("_valid").fill_null(False).to_numpy(zero_copy_only=False)[order]
    return pa.table({"_label": label[docs], DC: dc[docs], "_valid": valid[docs]})


def _cluster_sums(batch: pa.Table) -> pa.Table:
    """Rows of one label: cluster size, summed duplicate_count; short (invalid)
    documents are never merged (their identical copies are all kept)."""
    lab = batch.column("_label").to_numpy()
    order = np.argsort(lab, kind="stable")
    lab = lab[order]
    dc = batch.column(DC).to_numpy()[order]
    valid = batch.column("_valid").to_numpy(zero_copy_only=False)[order]
    starts = _group_starts(lab)
    if not len(lab):
        return pa.table({"_label": np.zeros(0, np.int64), "_dcsum": np.zeros(0), "_n": np.zeros(0, np.int64), "_keepall": np.zeros(0, bool)})
    return pa.table(
        {
            "_label": lab[starts],
            "_dcsum": np.add.reduceat(dc, starts),
            "_n": np.diff(np.append(starts, len(lab))).astype(np.int64),
            "_keepall": ~valid[starts],
        }
    )


def _survivors(batch: pa.Table) -> pa.Table:
    """Rows of one key (document rows, tag 0, and at most one cluster row,
    tag 1): keep one document row with the cluster's summed count when the key
    is its cluster's label; keep all rows of short documents; drop the rest."""
    k = batch.column(KEY).to_numpy()
    tag = batch.column("_tag").to_numpy()
    order = np.lexsort((-tag.astype(np.int16), k))  # cluster row first
    k, tag = k[order], tag[order]
    starts = _group_starts(k)
    gid = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(k))))
    has_c = (tag[starts] == 1)[gid]
    keepall = batch.column("_keepall").fill_null(False).to_numpy(zero_copy_only=False)[order]
    dcsum = batch.column("_dcsum").fill_null(0.0).to_numpy()[order]
    g_keepall = keepall[starts][gid]
    g_dcsum = dcsum[starts][gid]
    is_doc = tag == 0
    first_doc = is_doc & (np.arange(len(k)) == (starts[gid] + 1))
    keep = is_doc & has_c & (g_keepall | first_doc)
    rows = order[keep]
    out = batch.take(pa.array(rows))
    new_dc = np.where(g_keepall[keep], out.column(DC).to_numpy(zero_copy_only=False), g_dcsum[keep])
    return out.set_column(out.schema.get_field_index(DC), DC, pa.array(new_dc, pa.float64()))


def _block_summaries(ds) -> dict:
    """Row count and order-independent key digests, from per-block partials."""

    def part(batch: pa.Table) -> pa.Table:
        k = batch.column(KEY).to_numpy().view(U64)
        x = int(np.bitwise_xor.reduce(k)) if len(k) else 0
        s = int(np.sum(k, dtype=U64)) if len(k) else 0
        return pa.table({"n": [len(k)], "x": pa.array([x], pa.uint64()), "s": pa.array([s], pa.uint64())})

    n, x, s = 0, 0, 0
    for b in ds.map_batches(part, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None):
        for row in b.to_pylist():
            n += row["n"]
            x ^= row["x"]
            s = (s + row["s"]) % (1 << 64)
    return {"rows": n, "xor": x, "sum": s}


def _cluster_summary(clusters) -> dict[str, float]:
    def part(batch: pa.Table) -> pa.Table:
        n = batch.column("_n").to_numpy()
        keepall = batch.column("_keepall").to_numpy(zero_copy_only=False)
        merged = n[~keepall]
        return pa.table(
            {
                "clusters": [int(np.count_nonzero(merged > 1))],
                "largest": [int(merged.max()) if len(merged) else 0],
                "removed": [int(np.sum(merged - 1))],
                "short": [int(np.sum(n[keepall]))],
            }
        )

    out = {"clusters": 0, "largest_cluster": 0, "removed": 0, "short": 0}
    for b in clusters.map_batches(part, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None):
        for row in b.to_pylist():
            out["clusters"] += row["clusters"]
            out["largest_cluster"] = max(out["largest_cluster"], row["largest"])
            out["removed"] += row["removed"]
            out["short"] += row["short"]
    return out


def _abs(path: str) -> str:
    from tasks.storage import is_object_store

    return path if is_object_store(path) else os.path.abspath(path)


def _read_lance(uri: str, version: int, parts: int, storage_options: dict | None):
    import lance_ray

    return lance_ray.read_lance(
        uri, storage_options=storage_options, dataset_options={"version": version}, override_num_blocks=parts
    )


# ---------------------------------------------------------------------------
# Signature checkpoint


class SignatureCheckpoint:
    """The signatures of one input fingerprint, under ``base`` (local or object
    store), kept with the checkpoint mechanism of tasks/checkpoints.py:

    - ``signatures-<uuid>.lance``: written by one run only;
    - ``committed.json``: names the published dataset (relative to ``base``),
      its version and rows; written only after that dataset was verified
      complete, verified again on reuse.

    Two runs that finish at once may both write; the first to publish wins
    and the other uses its signatures and deletes its own.
    """

    MARKER = "committed.json"

    def __init__(self, base: str, storage_options: dict | None, node_path: str = "MinHash"):
        marker = f"{base.rstrip('/')}/{self.MARKER}"
        self.checkpoint = Checkpoint(marker, storage_options, node_path, "signature checkpoint", log)
        self.node_path = node_path

    def private_uri(self) -> str:
        return self.checkpoint.private_uri("signatures")

    def load(self, rows: int) -> tuple[str, int] | None:
        """(uri, version) of the published signatures when they are complete;
        None (after discarding incomplete ones) to recompute them."""
        marker = self.checkpoint.lookup(rows)
        return None if marker is None else (self.checkpoint.dataset_uri(marker), int(marker["version"]))

    def publish(self, uri: str, rows: int, meta: dict) -> tuple[str, int]:
        """Verify this run's dataset and name it in the marker; if another run
        published complete signatures meanwhile, use those and drop ours."""
        try:
            marker = self.checkpoint.publish(uri, rows, meta, prefer_published=True)
        except Incomplete as exc:
            raise NodeError(self.node_path, f"MinHash signatures written to {uri} are incomplete: {exc.problem}") from None
        return self.checkpoint.dataset_uri(marker), int(marker["version"])
