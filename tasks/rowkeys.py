"""Row keys, seeded per-row randomness and bounded distributed summaries.

Shared by the selection, sampling, ordering and splitting nodes (not a node
family itself). Three ideas keep those nodes distributed and reproducible:

* **Stable row keys.** ``row_hash`` (tasks/hashing.py) hashes a row's
  *content* (every column, nested lists and structs included) to a uint64,
  vectorised per block. A row's key therefore does not depend on which block
  it sits in, so the same input gives the same keys whatever the block count.
* **Seeded per-row randomness.** ``uniform(keys, seed, salt)`` turns those
  keys into U[0,1) numbers with a SplitMix64 mix: no per-block RNG streams.
* **Bounded summaries.** ``block_reduce`` maps every block to a small summary
  (a histogram over a fixed number of bins, a few counters) and merges them
  one at a time on the driver; ``top_k_threshold`` uses it to find an exact
  (or ``quantile_error``-bounded) rank threshold in (score, key) space by
  histogram refinement, so ties are broken by the key, deterministically.
  ``add_positions`` numbers the rows of a materialized dataset in order using
  one tiny remote task per block (block row counts, then offsets).

Nothing here collects rows on the driver.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.base import name_errors

# The hashes are defined in tasks/hashing.py; these names stay importable from
# here because the sampling, selection and ordering nodes use them with the
# summaries below.
from tasks.hashing import INTERNAL_PREFIX, U64, row_hash, seeded, uniform  # noqa: F401


# ---------------------------------------------------------------------------
# Distributed summaries


def block_reduce(ds, summarize: Callable[[pa.Table], Any], merge: Callable[[Any, Any], Any], init: Any, node=None) -> Any:
    """Map every block to a small picklable summary and merge the summaries
    one by one on the driver (memory: one summary, never the rows)."""
    summarize = name_errors(getattr(node, "path", "summary"), summarize)

    def one(batch: pa.Table) -> pa.Table:
        return pa.table({"summary": pa.array([pickle.dumps(summarize(batch))], pa.binary())})

    acc = init
    out = ds.map_batches(one, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        for raw in batch.column("summary").to_pylist():
            acc = merge(acc, pickle.loads(raw))
    return acc


def add_positions(ds, column: str):
    """Number the rows of ``ds`` 0..N-1 in dataset order into ``column``
    (int64). ``ds`` should be materialized; one small remote task per block
    counts rows, one per block appends the numbers; the driver holds only
    object references and per-block counts. Returns (dataset, N)."""
    import ray

    refs = ds.to_arrow_refs()
    if not refs:
        return ds, 0

    @ray.remote(num_cpus=0.25)
    def count(table) -> int:
        return table.num_rows

    @ray.remote(num_cpus=0.25)
    def number(table: pa.Table, start: int) -> pa.Table:
        pos = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
        if column in table.column_names:
            table = table.drop_columns([column])
        return table.append_column(column, pos)

    counts = ray.get([count.remote(r) for r in refs])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    numbered = [number.remote(r, int(s)) for r, s in zip(refs, starts)]
    return ray.data.from_arrow_refs(numbered), int(sum(counts))


# ---------------------------------------------------------------------------
# Rank thresholds in (score, key) space


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Keep rows whose (score, key) >= (score, key) lexicographically; rows
    with a NaN score are never kept. ``key`` may be 2**64 (none at ``score``)."""

    score: float
    key: int

    def mask(self, s: np.ndarray, h: np.ndarray) -> np.ndarray:
        above = s > self.score
        if self.key >= 1 << 64:
            return above
        return above | ((s == self.score) & (h >= U64(self.key)))


SCORE_CLIP = 1e300


def prepare_score(values: np.ndarray, larger: bool) -> np.ndarray:
    """Scores as float64 where larger = better, NaN for missing, clipped
    finite (so bin edges never overflow)."""
    s = np.asarray(values, dtype=np.float64)
    s = np.clip(s, -SCORE_CLIP, SCORE_CLIP)
    return s if larger else -s


def top_k_threshold(ds, k: "int | Callable[[int], int]", s_col: str, h_col: str, eps_rows: "float | Callable[[int], float]", node=None, bins: int = 4096, max_rounds: int = 48, on_histogram: "Callable[[np.ndarray, np.ndarray], None] | None" = None) -> tuple[Threshold, int, int]:
    """The threshold keeping the ``k`` rows with the largest (score, key),
    within ``eps_rows`` rows, by histogram refinement over a materialized
    dataset. Each round is one pass whose per-block summary is ``bins``
    counters. Returns (threshold, rows kept by it, N valid rows).

    ``on_histogram(edges, counts)``, when given, is called once (if N > 0)
    with the histogram of all N scores over [min, max]: the first round's
    ``bins`` bins (``edges[i] <= s < edges[i + 1]``), or one bin when no
    round was needed (all rows or none kept, or a single score value). It
    is what a report shows, at no extra pass."""
    n, smin, smax = block_reduce(ds, _score_range(s_col), _merge_ranges, (0, math.inf, -math.inf), node)
    k = max(0, min(int(k(n) if callable(k) else k), n))
    if callable(eps_rows):
        eps_rows = eps_rows(n)
    if on_histogram is not None and n and (k in (0, n) or smin == smax):
        on_histogram(np.array([smin, np.nextafter(smax, np.inf)]), np.array([n], dtype=np.int64))
    if k == 0 or n == 0:
        return Threshold(math.inf, 1 << 64), 0, n  # keeps nothing (scores are clipped finite)
    if k == n:
        return Threshold(-math.inf, 0), n, n

    above = 0  # rows known to be above the candidate range
    mode = "score"
    hlo, hhi, v = 0, 1 << 64, 0.0
    for round_ in range(max_rounds):
        if mode == "score" and smin == smax:
            mode, v, hlo, hhi = "hash", smin, 0, 1 << 64
        if mode == "score":
            counts, at, mins, maxs, edges = _score_histogram(ds, s_col, smin, smax, bins, node)
            if on_histogram is not None and round_ == 0:
                on_histogram(edges, counts)
        else:
            counts, at, edges_h = _key_histogram(ds, s_col, h_col, v, hlo, hhi, bins, node)
        j, excl, incl = _kth_bin(counts, above, k)
        best = (at(j + 1), excl, n) if abs(excl - k) <= abs(incl - k) else (at(j), incl, n)
        # A one-key bin in the key dimension holds identical rows: stop.
        single = mode == "hash" and edges_h[j + 1] - edges_h[j] == 1
        if min(abs(excl - k), abs(incl - k)) <= eps_rows or single:
            return best
        above = excl  # refine inside bin j
        if mode == "score":
            smin, smax = float(mins[j]), float(maxs[j])
        else:
            hlo, hhi = int(edges_h[j]), int(edges_h[j + 1])
    return best  # out of rounds: the best boundary of the last bin


def _score_range(s_col: str):
    def stats(batch: pa.Table):
        s = batch.column(s_col).to_numpy()
        s = s[~np.isnan(s)]
        if not len(s):
            return (0, math.inf, -math.inf)
        return (len(s), float(s.min()), float(s.max()))

    return stats


def _merge_ranges(a, b):
    return (a[0] + b[0], min(a[1], b[1]), max(a[2], b[2]))


def _score_histogram(ds, s_col: str, smin: float, smax: float, bins: int, node):
    """One pass: counts, minima and maxima of the scores in ``bins`` equal
    bins over [smin, smax]. Returns (counts, the threshold at a bin edge,
    mins, maxs, the bin edges)."""
    edges = np.linspace(smin, smax, bins + 1)
    edges[-1] = np.nextafter(smax, np.inf)
    lo, hi = float(edges[0]), float(edges[-1])

    def hist(batch: pa.Table):
        s = batch.column(s_col).to_numpy()
        s = s[(s >= lo) & (s < hi)]
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
        counts = np.bincount(idx, minlength=bins).astype(np.int64)
        mins = np.full(bins, np.inf)
        maxs = np.full(bins, -np.inf)
        np.minimum.at(mins, idx, s)
        np.maximum.at(maxs, idx, s)
        return counts, mins, maxs

    def merge(a, b):
        return b if a is None else (a[0] + b[0], np.minimum(a[1], b[1]), np.maximum(a[2], b[2]))

    counts, mins, maxs = block_reduce(ds, hist, merge, None, node)
    return counts, lambda idx: Threshold(float(edges[idx]), 0), mins, maxs, edges


def _key_histogram(ds, s_col: str, h_col: str, v: float, hlo: int, hhi: int, bins: int, node):
    """One pass over the rows scoring exactly ``v``: counts of their keys in
    [hlo, hhi), in at most about ``bins`` bins of a power-of-two width.
    Returns (counts, the threshold at a bin edge, the bin edges)."""
    width = hhi - hlo
    shift = max(0, (width.bit_length() - 1) - int(math.log2(bins)))
    nb = int(-(-width // (1 << shift)))

    def hist(batch: pa.Table):
        s = batch.column(s_col).to_numpy()
        h = keys_where(batch, h_col, s == v)
        if hhi < 1 << 64:
            h = h[(h >= U64(hlo)) & (h < U64(hhi))]
        else:
            h = h[h >= U64(hlo)]
        idx = ((h - U64(hlo)) >> U64(shift)).astype(np.int64)
        return np.bincount(idx, minlength=nb).astype(np.int64)

    counts = block_reduce(ds, hist, lambda a, b: b if a is None else a + b, None, node)
    edges = [hlo + (j << shift) for j in range(nb)] + [hhi]
    return counts, lambda idx: Threshold(v, int(edges[idx])), edges


def keys_where(batch: pa.Table, h_col: str, where: np.ndarray) -> np.ndarray:
    """The keys of the rows ``where`` selects: the key column ``h_col``, or
    where the batch has none (keyed by score alone), those rows' content
    hash, the same ``row_hash`` the key column would hold."""
    if h_col in batch.column_names:
        return batch.column(h_col).to_numpy()[where]
    if not where.any():
        return np.zeros(0, U64)
    return row_hash(batch.filter(pa.array(where)))


def _kth_bin(counts, above: int, k: int) -> tuple[int, int, int]:
    """Walk bins from the top until the k-th row is inside one: (bin, rows
    above it, rows down to its bottom)."""
    cum = above
    j = len(counts) - 1
    while j > 0 and cum + int(counts[j]) < k:
        cum += int(counts[j])
        j -= 1
    return j, cum, cum + int(counts[j])


def named(node, fn: Callable[[pa.Table], pa.Table]) -> Callable[[pa.Table], pa.Table]:
    """Wrap a batch function so failures name the node (no stats recorded:
    for the internal passes of multi-pass nodes)."""
    return name_errors(node.path, fn)


def numeric_values(batch: pa.Table, name: str) -> np.ndarray:
    """float64 values of a (dotted) numeric column; nulls as NaN."""
    from tasks.schema import get_path

    col = get_path(batch, name)
    if not pa.types.is_floating(col.type) or col.type != pa.float64():
        col = col.cast(pa.float64())
    return col.to_numpy() if col.null_count == 0 else pc.fill_null(col, float("nan")).to_numpy()


def drop_internal(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in batch.column_names if c.startswith(INTERNAL_PREFIX)])
