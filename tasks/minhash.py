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
import uuid
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import Field

from tasks.base import Node, NodeError, NodeParams, Observation, Report, RunContext, Stream, register

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


# ---------------------------------------------------------------------------
# Vectorised helpers (numpy / Arrow)

U64 = np.uint64


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrapping arithmetic)."""
    z = np.asarray(x, dtype=U64) + U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


def _one_chunk(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 0:
            return pa.array([], type=col.type)
        return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    return col


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, uint8 data) of a string/binary array, zero-copy where possible."""
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        arr = arr.cast(pa.large_binary())
    elif pa.types.is_large_string(arr.type):
        arr = arr.view(pa.large_binary())
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(1, np.uint8)
    return offsets, data


def hash_binary(arr: pa.Array) -> np.ndarray:
    arr = _one_chunk(arr)
    out = np.empty(len(arr), dtype=U64)
    if len(arr):
        offsets, data = _buffers(arr)
        _kernels()["hash_bytes"](offsets, data, out)
    return out


_NULL_HASH = U64(0x5BD1E9955BD1E995)


def hash_column(col) -> np.ndarray:
    """A 64-bit hash per value, vectorised for strings, binaries and numbers;
    nested or exotic types hash their Python repr (slow but rare)."""
    arr = _one_chunk(col)
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    n = len(arr)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        h = hash_binary(arr)
    elif pa.types.is_floating(t):
        vals = arr.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        h = mix64(np.ascontiguousarray(vals).view(U64))
    elif pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t):
        if pa.types.is_temporal(t):
            arr = arr.view(pa.int64()) if t.bit_width == 64 else arr.view(pa.int32())
        vals = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        h = mix64(np.ascontiguousarray(vals).view(U64))
    else:
        h = hash_binary(pa.array([repr(v).encode() for v in arr.to_pylist()], pa.large_binary()))
    if arr.null_count:
        h = np.where(arr.is_null().to_numpy(zero_copy_only=False), _NULL_HASH, h)
    return h.astype(U64, copy=False) if n else np.empty(0, U64)


def row_keys(table: pa.Table) -> np.ndarray:
    """Content key of every row: all columns, in schema order, hashed."""
    h = np.full(table.num_rows, U64(len(table.column_names)), dtype=U64)
    for i, name in enumerate(table.column_names):
        h = mix64(h * U64(0x100000001B3) ^ hash_column(table.column(name)) ^ U64(i + 1))
    return h


def as_text(arr, node_path: str, col: str) -> pa.Array:
    """The text column as a valid UTF-8 string array (bad bytes replaced)."""
    arr = _one_chunk(arr)
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
    return _one_chunk(s)


def kernel_input(texts: pa.Array, language: str) -> pa.Array:
    """What the signature kernel tokenises: ASCII rows of ``en`` text as they
    are (the kernel normalises ASCII itself, identically), every other row
    normalised by ``normalise``."""
    texts = _one_chunk(texts)
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
        offsets, data = _buffers(norm)
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
    from tasks.base import instrument

    return ds.map_batches(
        instrument(node_path, fn, RunContext(), None),
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
        self._publish_stats(result.stats, ctx)
        return Stream(self.tap(result.output, ctx), self.output_schema(stream.schema))

    def _publish_stats(self, stats: dict[str, float], ctx: RunContext) -> None:
        if ctx.stats_actor is None:
            return
        import ray

        from tasks.base import _stats_handle

        sums = {f"minhash.{k}": float(v) for k, v in stats.items()}
        ray.get(_stats_handle(ctx.stats_actor, ctx.ray_namespace).record.remote(self.path, None, 0, 0.0, None, sums, None, 0))

    def run(self, stream: Stream, ctx: RunContext) -> DedupResult:
        """Every stage; returns handles for tests and the bench."""
        p = self.params
        path = self.path
        out_schema = self.output_schema(stream.schema)
        col = p.input_col_name
        parts = max(1, p.num_parallel)
        nb_, r = self.bands()
        stats: dict[str, float] = {"bands": nb_, "rows": r}
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        # 1. prep -------------------------------------------------------------
        keyed_schema = out_schema.append(pa.field(KEY, pa.int64()))

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
            return batch.append_column(KEY, pa.array(_i64(row_keys(batch)), pa.int64()))

        # Batches bundle tiny upstream blocks into one task (a reader at
        # num_parallel 960 hands over 1-row blocks for 1,000 rows).
        prepped = _map(stream.ds, prep, path, batch_size=MIN_ROWS_PER_PART).materialize()
        n_docs = prepped.count()
        # The width is known only now that the rows are: regroup them into it
        # (upstream may hand over far more blocks than rows).
        parts = shuffle_parts(n_docs, max(1, p.num_parallel), prepped.size_bytes())
        if prepped.num_blocks() != parts:
            prepped = prepped.repartition(parts).materialize()
        summary = _block_summaries(prepped)
        stats["documents_considered"] = n_docs
        stats["partitions"] = parts
        timings["prep"] = time.perf_counter() - t0
        if n_docs == 0:
            stats.update(documents_out=0, clusters=0, largest_cluster=0, removed=0, short=0)
            empty = _map(prepped, lambda b: b.select(out_schema.names).cast(out_schema), path)
            return DedupResult(output=empty, prepped=prepped, stats=stats)

        # 2. signatures (checkpointed) -----------------------------------------
        t1 = time.perf_counter()
        so = dict(ctx.storage_options) or None
        fingerprint = self._fingerprint(summary, stream.schema)
        ckpt = SignatureCheckpoint(_abs(os.path.join(ctx.work_dir, "minhash", fingerprint)), so, path)
        found = ckpt.load(n_docs)
        resumed = found is not None
        if not resumed:
            a, b = permutations(p.num_permutations, p.seed)
            lang, ngram, min_len = p.language, p.ngram_size, p.min_length

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

            private = ckpt.private_uri()
            _write_lance(_map(prepped.select_columns([col, DC, KEY]), sign, path), private, SIG_SCHEMA(nb_), so)
            found = ckpt.publish(private, n_docs, {"params": p.model_dump(), "bands": nb_, "band_rows": r})
        sig_uri, sig_version = found
        sig = _read_lance(sig_uri, sig_version, parts, so)
        timings["signatures"] = time.perf_counter() - t1

        # 3. band buckets -> star edges ---------------------------------------
        t2 = time.perf_counter()

        def explode(batch: pa.Table) -> pa.Table:
            valid = batch.column("_valid").to_numpy(zero_copy_only=False)
            keys = batch.column(KEY).to_numpy()[valid]
            bands = _one_chunk(batch.column("_bands")).flatten().to_numpy().reshape(-1, nb_)[valid]
            return pa.table({"_bucket": bands.reshape(-1), KEY: np.repeat(keys, nb_)})

        buckets = _map(sig, explode, path)
        edges = _map(_sort_shuffle(buckets, "_bucket", parts), bucket_edges, path).select_columns(["u", "v"]).materialize()
        timings["buckets"] = time.perf_counter() - t2

        # 4. connected components ----------------------------------------------
        t3 = time.perf_counter()
        labels, rounds = connected_components(edges, parts, path)
        stats["cc_rounds"] = rounds
        timings["components"] = time.perf_counter() - t3

        # 5. cluster table: key -> label, then sums per label ---------------------
        t4 = time.perf_counter()
        slim = _map(sig, _slim_rows, path)
        lab = _map(labels, _label_rows, path)
        keyed = _map(_sort_shuffle(slim.union(lab), KEY, parts), _attach_labels, path)
        clusters = _map(_sort_shuffle(keyed, "_label", parts), _cluster_sums, path).materialize()
        csum = _cluster_summary(clusters)
        stats.update(csum)
        stats["documents_out"] = n_docs - csum["removed"]
        timings["clusters"] = time.perf_counter() - t4

        # 6. survivors (lazy; executed by the consumer) ---------------------------
        out_names = out_schema.names

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
            return pa.table(cols, schema=JOIN_SCHEMA(keyed_schema))

        def survivors(batch: pa.Table) -> pa.Table:
            return _survivors(batch).select(out_names).cast(out_schema)

        joined = _sort_shuffle(_map(prepped, left, path).union(_map(clusters, right, path)), KEY, parts)
        output = _map(joined, survivors, path)
        timings["total_before_output"] = time.perf_counter() - t0
        stats["short"] = float(csum.get("short", 0))
        log.info("%s: MinHash stages %s", path, {k: round(v, 2) for k, v in timings.items()})
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


def _write_lance(ds, uri: str, schema: pa.Schema, storage_options: dict | None) -> None:
    from tasks.storage import is_object_store
    from tasks.writers import _make_datasink_class

    if not is_object_store(uri):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
    sink = _make_datasink_class()(uri, schema=schema, mode="overwrite", storage_options=storage_options)
    ds.write_datasink(sink)


def _read_lance(uri: str, version: int, parts: int, storage_options: dict | None):
    import lance_ray

    return lance_ray.read_lance(
        uri, storage_options=storage_options, dataset_options={"version": version}, override_num_blocks=parts
    )


# ---------------------------------------------------------------------------
# Signature checkpoint


def lance_problem(uri: str, version: int, rows: int, storage_options: dict | None) -> str | None:
    """What is wrong with the Lance dataset ``uri`` at ``version``, or None
    when it is complete: every data file of every fragment present, at the
    size the manifest records, and ``rows`` rows. (Opening a dataset reads
    only its manifest, so a lost data file shows only here, or mid-run.)"""
    import lance
    import pyarrow.fs as pafs

    from tasks.storage import filesystem_for

    fs, inner = filesystem_for(uri, storage_options or {})
    data = inner.rstrip("/") + "/data"
    listed = fs.get_file_info(pafs.FileSelector(data, recursive=True, allow_not_found=True))
    sizes = {f.path[len(data) + 1 :]: f.size for f in listed if f.type == pafs.FileType.File}
    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    for frag in ds.get_fragments():
        for df in frag.data_files():
            size = sizes.get(str(df.path))
            if size is None:
                return f"data file {df.path} of fragment {frag.fragment_id} is missing"
            if df.file_size_bytes and size != df.file_size_bytes:
                return f"data file {df.path} has {size} bytes, its manifest says {df.file_size_bytes}"
    n = ds.count_rows()
    return None if n == rows else f"it holds {n} rows, expected {rows}"


@dataclasses.dataclass
class _Incomplete(Exception):
    uri: str
    problem: str
    provable: bool


class SignatureCheckpoint:
    """The signatures of one fingerprint, under ``base`` (local or object store):

    - ``signatures-<uuid>.lance``: written by one run only, under a name no
      other run uses, so concurrent runs never share a half-written dataset;
    - ``committed.json``: names the published dataset, its version and rows.
      Written last and atomically (os.replace; one PUT on an object store),
      only after that dataset was verified complete; verified again on reuse.

    Two runs that finish at once may both publish; the marker then names one
    complete dataset and the other stays unreferenced (never half-written).
    """

    MARKER = "committed.json"

    def __init__(self, base: str, storage_options: dict | None, node_path: str = "MinHash"):
        self.base = base.rstrip("/")
        self.so = storage_options
        self.node_path = node_path

    def private_uri(self) -> str:
        return f"{self.base}/signatures-{uuid.uuid4().hex}.lance"

    def load(self, rows: int) -> tuple[str, int] | None:
        """(uri, version) of the published signatures when they are complete.
        Incomplete ones are discarded (logged; deleted when files are provably
        missing) so that the caller recomputes them."""
        try:
            return self._published(rows)
        except _Incomplete as bad:
            log.warning("%s: signature checkpoint %s discarded (%s); recomputing it", self.node_path, bad.uri, bad.problem)
            if bad.provable:
                self._remove(bad.uri)
            return None

    def publish(self, uri: str, rows: int, meta: dict) -> tuple[str, int]:
        """Verify this run's dataset and name it in the marker; if another run
        published complete signatures meanwhile, use those and drop ours."""
        import lance

        version = lance.dataset(uri, storage_options=self.so).version
        problem = lance_problem(uri, version, rows, self.so)
        if problem:
            raise NodeError(self.node_path, f"MinHash signatures written to {uri} are incomplete: {problem}")
        try:
            theirs = self._published(rows)
        except _Incomplete:
            theirs = None
        if theirs is not None:
            self._remove(uri)
            return theirs
        self._write_marker({"dataset": uri[len(self.base) + 1 :], "version": version, "rows": rows, **meta})
        return uri, version

    def _published(self, rows: int) -> tuple[str, int] | None:
        """None when nothing is published; raises _Incomplete when what is
        published is not a complete dataset of ``rows`` rows."""
        uri = f"{self.base}/{self.MARKER}"
        try:
            marker = self._read_marker()
            if marker is None:
                return None
            uri, version = f"{self.base}/{marker['dataset']}", int(marker["version"])
            problem = lance_problem(uri, version, rows, self.so)
        except Exception as exc:  # a checkpoint only saves time: recompute rather than fail
            raise _Incomplete(uri, f"unreadable ({type(exc).__name__}: {exc})", provable=False) from None
        if problem:
            raise _Incomplete(uri, problem, provable=True)
        return uri, version

    def _fs(self, path: str):
        from tasks.storage import filesystem_for

        return filesystem_for(path, self.so or {})

    def _read_marker(self) -> dict | None:
        import pyarrow.fs as pafs

        fs, inner = self._fs(f"{self.base}/{self.MARKER}")
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(inner) as f:
            return json.loads(f.read().decode())

    def _write_marker(self, marker: dict) -> None:
        from tasks.storage import is_object_store

        body = json.dumps(marker, indent=1, sort_keys=True, default=str).encode()
        path = f"{self.base}/{self.MARKER}"
        if is_object_store(path):  # an object appears whole or not at all
            fs, inner = self._fs(path)
            with fs.open_output_stream(inner) as f:
                f.write(body)
            return
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _remove(self, uri: str) -> None:
        fs, inner = self._fs(uri)
        try:
            fs.delete_dir(inner)
        except Exception as exc:  # leftovers cost disk, not correctness
            log.warning("%s: could not remove %s: %s", self.node_path, uri, exc)
