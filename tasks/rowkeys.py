"""Row keys, seeded per-row randomness and bounded distributed summaries.

Shared by the selection, sampling, ordering and splitting nodes (not a node
family itself). Three ideas keep those nodes distributed and reproducible:

* **Stable row keys.** ``row_hash`` hashes a row's *content* (every column,
  nested lists and structs included) to a uint64, vectorised per block. A
  row's key therefore does not depend on which block it sits in, so the same
  input gives the same keys whatever the block count.
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

from tasks.base import NodeError

U64 = np.uint64
_NULL_H = U64(0x6A09E667F3BCC908)
_GOLDEN = U64(0x9E3779B97F4A7C15)
INTERNAL_PREFIX = "__kf_"


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=U64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
        return z ^ (z >> U64(31))


def _to_array(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 0:
            return pa.array([], type=col.type)
        return pa.concat_arrays(col.chunks) if col.num_chunks > 1 else col.chunk(0)
    return col


def hash_array(col) -> np.ndarray:
    """A uint64 hash per element of an Arrow array of any type (nested lists
    and structs included); nulls hash to a fixed value."""
    import pandas as pd

    arr = _to_array(col)
    n = len(arr)
    t = arr.type
    if n == 0:
        return np.zeros(0, dtype=U64)
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_null(t):
        return np.full(n, _NULL_H, dtype=U64)
    valid = None
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_map(t):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        child = arr.flatten()
        if pa.types.is_map(t) and not isinstance(child, pa.StructArray) and hasattr(arr, "items"):
            child = pa.StructArray.from_arrays([arr.keys, arr.items], ["key", "value"])
        ch = hash_array(child)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pos = (np.arange(len(ch), dtype=np.int64) - np.repeat(offsets[:-1], lengths)).astype(U64)
        contrib = splitmix64(ch ^ splitmix64(pos))
        cs = np.zeros(len(ch) + 1, dtype=U64)
        np.cumsum(contrib, out=cs[1:])
        with np.errstate(over="ignore"):
            seg = cs[offsets[1:]] - cs[offsets[:-1]]
        h = splitmix64(seg ^ splitmix64(lengths.astype(U64) + U64(7)))
    elif pa.types.is_struct(t):
        h = np.full(n, U64(0x3C6EF372FE94F82B), dtype=U64)
        for i, field in enumerate(arr.flatten()):
            h = splitmix64(h ^ hash_array(field) ^ U64(i + 1))
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        filled = pc.fill_null(arr, "" if pa.types.is_string(t) or pa.types.is_large_string(t) else b"")
        h = pd.util.hash_array(filled.to_numpy(zero_copy_only=False), categorize=False).astype(U64)
    elif pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        # The fill value must have the column's type: Arrow will not make a
        # boolean scalar from 0. Nulls are re-hashed below anyway.
        values = pc.fill_null(arr, False if pa.types.is_boolean(t) else 0).to_numpy(zero_copy_only=False)
        if pa.types.is_floating(t):
            values = values.astype(np.float64) + 0.0  # -0.0 -> 0.0
        h = pd.util.hash_array(values, categorize=False).astype(U64)
    elif pa.types.is_temporal(t):
        h = hash_array(arr.cast(pa.int64()) if not pa.types.is_date32(t) and not pa.types.is_time32(t) else arr.cast(pa.int32()))
    else:  # decimals and other scalars: through their text form
        h = hash_array(arr.cast(pa.string()))
    if valid is not None:
        h = np.where(valid, h, _NULL_H)
    return h


def row_hash(table: pa.Table, columns: list[str] | None = None) -> np.ndarray:
    """A uint64 content hash per row: independent of block layout and of the
    column order (columns are combined in name order). Internal ``__kf_``
    columns are left out."""
    names = sorted(columns if columns is not None else [c for c in table.column_names if not c.startswith(INTERNAL_PREFIX)])
    h = np.full(table.num_rows, U64(0xBB67AE8584CAA73B), dtype=U64)
    for name in names:
        name_h = U64(int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") ^ len(name))
        h = splitmix64(h ^ splitmix64(hash_array(table.column(name)) ^ name_h))
    return h


def seeded(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Seeded uint64 per row from stable keys."""
    mix = splitmix64(np.array([(int(seed) * 0x100000001B3 + int(salt) * 0x9E3779B1) % (1 << 64)], dtype=U64))[0]
    return splitmix64(np.asarray(keys, dtype=U64) ^ mix)


def uniform(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Seeded U[0,1) per row from stable keys (53 random bits)."""
    return (seeded(keys, seed, salt) >> U64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------
# Distributed summaries


def block_reduce(ds, summarize: Callable[[pa.Table], Any], merge: Callable[[Any, Any], Any], init: Any, node=None) -> Any:
    """Map every block to a small picklable summary and merge the summaries
    one by one on the driver (memory: one summary, never the rows)."""
    path = getattr(node, "path", "summary")

    def one(batch: pa.Table) -> pa.Table:
        try:
            value = summarize(batch)
        except NodeError:
            raise
        except Exception as exc:
            raise NodeError(path, f"{type(exc).__name__}: {exc}") from exc
        return pa.table({"summary": pa.array([pickle.dumps(value)], pa.binary())})

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


def top_k_threshold(ds, k: "int | Callable[[int], int]", s_col: str, h_col: str, eps_rows: "float | Callable[[int], float]", node=None, bins: int = 4096, max_rounds: int = 48) -> tuple[Threshold, int, int]:
    """The threshold keeping the ``k`` rows with the largest (score, key),
    within ``eps_rows`` rows, by histogram refinement over a materialized
    dataset. Each round is one pass whose per-block summary is ``bins``
    counters. Returns (threshold, rows kept by it, N valid rows)."""

    def stats(batch: pa.Table):
        s = batch.column(s_col).to_numpy()
        s = s[~np.isnan(s)]
        if not len(s):
            return (0, math.inf, -math.inf)
        return (len(s), float(s.min()), float(s.max()))

    n, smin, smax = block_reduce(
        ds, stats, lambda a, b: (a[0] + b[0], min(a[1], b[1]), max(a[2], b[2])), (0, math.inf, -math.inf), node
    )
    k = max(0, min(int(k(n) if callable(k) else k), n))
    if callable(eps_rows):
        eps_rows = eps_rows(n)
    if k == 0 or n == 0:
        return Threshold(math.inf, 1 << 64), 0, n  # keeps nothing (scores are clipped finite)
    if k == n:
        return Threshold(-math.inf, 0), n, n

    above = 0  # rows known to be above the candidate range
    mode = "score"
    hlo, hhi, v = 0, 1 << 64, 0.0
    for _ in range(max_rounds):
        if mode == "score" and smin == smax:
            mode, v, hlo, hhi = "hash", smin, 0, 1 << 64
        if mode == "score":
            edges = np.linspace(smin, smax, bins + 1)
            edges[-1] = np.nextafter(smax, np.inf)
            lo, hi = float(edges[0]), float(edges[-1])

            def hist(batch: pa.Table, edges=edges, lo=lo, hi=hi):
                s = batch.column(s_col).to_numpy()
                s = s[(s >= lo) & (s < hi)]
                idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
                counts = np.bincount(idx, minlength=bins).astype(np.int64)
                mins = np.full(bins, np.inf)
                maxs = np.full(bins, -np.inf)
                np.minimum.at(mins, idx, s)
                np.maximum.at(maxs, idx, s)
                return counts, mins, maxs

            counts, mins, maxs = block_reduce(
                ds,
                hist,
                lambda a, b: b if a is None else (a[0] + b[0], np.minimum(a[1], b[1]), np.maximum(a[2], b[2])),
                None,
                node,
            )
        else:
            width = hhi - hlo
            shift = max(0, (width.bit_length() - 1) - int(math.log2(bins)))
            nb = int(-(-width // (1 << shift)))

            def hist(batch: pa.Table, v=v, hlo=hlo, hhi=hhi, shift=shift, nb=nb):
                s = batch.column(s_col).to_numpy()
                h = batch.column(h_col).to_numpy()
                sel = s == v
                h = h[sel]
                if hhi < 1 << 64:
                    h = h[(h >= U64(hlo)) & (h < U64(hhi))]
                else:
                    h = h[h >= U64(hlo)]
                idx = ((h - U64(hlo)) >> U64(shift)).astype(np.int64)
                return np.bincount(idx, minlength=nb).astype(np.int64)

            counts = block_reduce(ds, hist, lambda a, b: b if a is None else a + b, None, node)
            edges_h = [hlo + (j << shift) for j in range(nb)] + [hhi]
        # Walk bins from the top until the k-th row is inside one.
        cum = above
        j = len(counts) - 1
        while j > 0 and cum + int(counts[j]) < k:
            cum += int(counts[j])
            j -= 1
        excl, incl = cum, cum + int(counts[j])

        def at(idx: int) -> Threshold:
            if mode == "score":
                return Threshold(float(edges[idx]), 0)
            return Threshold(v, int(edges_h[idx]))

        # A one-key bin in the key dimension holds identical rows: stop.
        single = mode == "hash" and edges_h[j + 1] - edges_h[j] == 1
        if min(abs(excl - k), abs(incl - k)) <= eps_rows or single:
            return (at(j + 1), excl, n) if abs(excl - k) <= abs(incl - k) else (at(j), incl, n)
        # Refine inside bin j.
        above = excl
        if mode == "score":
            smin, smax = float(mins[j]), float(maxs[j])
        else:
            hlo, hhi = int(edges_h[j]), int(edges_h[j + 1])
    # Out of rounds: best boundary of the last bin.
    return (at(j + 1), excl, n) if abs(excl - k) <= abs(incl - k) else (at(j), incl, n)


def named(node, fn: Callable[[pa.Table], pa.Table]) -> Callable[[pa.Table], pa.Table]:
    """Wrap a batch function so failures name the node (no stats recorded:
    for the internal passes of multi-pass nodes)."""
    path = node.path

    def run(batch: pa.Table) -> pa.Table:
        try:
            return fn(batch)
        except NodeError:
            raise
        except Exception as exc:
            raise NodeError(path, f"{type(exc).__name__}: {exc}") from exc

    return run


def numeric_field(node, schema: pa.Schema, name: str) -> pa.Field:
    """The (possibly dotted) numeric column ``name`` of ``schema``, or a
    NodeError naming the node, the column and what was found instead."""
    from tasks.schema import field_at

    try:
        field = field_at(schema, name)
    except KeyError:
        raise node.error(f"no column {name!r} (columns: {', '.join(schema.names)})") from None
    t = field.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t) or pa.types.is_null(t)):
        raise node.error(f"column {name!r} is {t}, not numeric")
    return field


def numeric_values(batch: pa.Table, name: str) -> np.ndarray:
    """float64 values of a (dotted) numeric column; nulls as NaN."""
    from tasks.schema import get_path

    col = get_path(batch, name)
    if not pa.types.is_floating(col.type) or col.type != pa.float64():
        col = col.cast(pa.float64())
    return col.to_numpy() if col.null_count == 0 else pc.fill_null(col, float("nan")).to_numpy()


def drop_internal(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in batch.column_names if c.startswith(INTERNAL_PREFIX)])
