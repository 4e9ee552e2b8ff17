"""Selection nodes (SPEC §6): FilterByRatio and Selector.

Both run distributed. Rank-based selections (keep the top ``keep_ratio``,
an exact-size random sample, the top N by score) materialize their input
once, find the rank threshold with bounded per-block histograms merged on
the driver (``tasks.rowkeys.top_k_threshold``), and filter in a last lazy
pass, so the output keeps the input order. Ties in the score are broken by a
hash of the row's content, so the result is the same whatever the block
count; randomness is a seeded mix of that hash.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.base import Node, NodeParams, Observation, Report, RunContext, Stream, register
from tasks.checks import log_without_effect, require_column
from tasks.reports import DIST, coarsen, histogram_report, read_bins, read_value, share
from tasks.rowkeys import (
    U64,
    drop_internal,
    keys_where,
    named,
    numeric_values,
    prepare_score,
    row_hash,
    seeded,
    top_k_threshold,
    uniform,
)

log = logging.getLogger("kaiyuan.nodes")

S_COL, H_COL = "__kf_s", "__kf_h"


def keyed(node: Node, stream: Stream, score: str | None, larger: bool = True, seed: int | None = None,
          keys: bool = True):
    """The input plus a score column (larger = kept first; NaN = never) and a
    content-hash key column (seeded when ``seed`` is given), materialized once.
    ``keys=False`` (a selection by score alone): no key column; the few rows
    tied at a threshold are hashed when needed (``keys_where``), since
    hashing every row's content was most of such a selection's work."""

    def add(batch: pa.Table) -> pa.Table:
        if score is None:
            s = np.zeros(batch.num_rows)
        else:
            s = prepare_score(numeric_values(batch, score), larger)
        batch = batch.append_column(S_COL, pa.array(s, pa.float64()))
        if not keys:
            return batch
        h = row_hash(batch)
        if seed is not None:
            h = seeded(h, seed, 1)
        return batch.append_column(H_COL, pa.array(h, pa.uint64()))

    ds = stream.ds.map_batches(named(node, add), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    return ds.materialize()


def keep_top(node: Node, mat, k, eps_rows, ctx: RunContext, what: str, drop: bool = True, larger: bool | None = None):
    """Filter a keyed, materialized dataset to its top-k rows (input order
    kept); returns the lazy dataset. With ``larger`` (the score's direction),
    the score's distribution, threshold and kept rows go to the node's
    metrics (``distribution_sums``), from the histogram the threshold search
    computes anyway."""
    hist: list = []
    on_histogram = None if larger is None else (lambda edges, counts: hist.append((edges, counts)))
    threshold, kept, n = top_k_threshold(mat, k, S_COL, H_COL, eps_rows, node, on_histogram=on_histogram)
    log.info("%s: %s: keeping %d of %d rows", node.path, what, kept, n)
    if larger is not None:
        node.report_metrics(ctx, distribution_sums(hist[0] if hist else None, threshold, kept, n, larger))

    def keep(batch: pa.Table) -> pa.Table:
        s = batch.column(S_COL).to_numpy()
        tied = s == threshold.score
        h = np.zeros(len(s), U64)
        h[tied] = keys_where(batch, H_COL, tied)
        mask = threshold.mask(s, h)
        out = batch.filter(pa.array(mask))
        return drop_internal(out) if drop else out

    return mat.map_batches(node.batch_fn(keep, ctx), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def distribution_sums(hist, threshold, kept: int, n: int, larger: bool) -> dict[str, float]:
    """The sums a selection reports once (read back by ``selection_report``):
    the score histogram coarsened to display bins, rows kept per bin, the
    bin holding the threshold, the threshold, and the rows kept and scored.
    ``hist`` is in the search's space (larger = kept first, so negated for
    ``smaller``); the sums are in the column's own values."""
    sums = {f"{DIST}reports": 1.0, f"{DIST}scored": float(n), f"{DIST}kept": float(kept)}
    if hist is None:
        return sums
    edges, counts = coarsen(*hist)
    t = threshold.score
    kept_bins = np.zeros_like(counts)
    mark = None
    j = int(np.searchsorted(edges, t, side="right")) - 1 if math.isfinite(t) else (-1 if t < 0 else len(counts))
    if j < 0:  # below every score: all kept
        kept_bins = counts.copy()
    elif j < len(counts):
        # Bins above the threshold's are kept whole, bins below it not at
        # all: the rest of the kept rows are in its bin.
        kept_bins[j + 1 :] = counts[j + 1 :]
        kept_bins[j] = kept - int(counts[j + 1 :].sum())
        mark = j
    if not larger:
        edges, counts, kept_bins = -edges[::-1], counts[::-1], kept_bins[::-1]
        mark = None if mark is None else len(counts) - 1 - mark
        t = -t
    sums[f"{DIST}bins"] = float(len(counts))
    sums.update({f"{DIST}edge:{i:02d}": float(e) for i, e in enumerate(edges)})
    sums.update({f"{DIST}bin:{i:02d}": float(c) for i, c in enumerate(counts) if c})
    sums.update({f"{DIST}kept:{i:02d}": float(c) for i, c in enumerate(kept_bins) if c})
    if mark is not None:
        sums[f"{DIST}mark"] = float(mark)
        sums[f"{DIST}threshold"] = float(t)
        if 0 < threshold.key < 1 << 64:
            sums[f"{DIST}tie"] = 1.0
    return sums


def selection_report(obs: Observation, title: str, what: str, larger: bool) -> Report | None:
    """The report of a selection by score: the score histogram with the
    threshold's bin marked, the threshold and the kept share (rows kept /
    rows in, rows without a score included)."""
    sums = obs.sums
    per = sums.get(f"{DIST}reports")
    if not per:
        return None
    scored, kept = int(read_value(sums, "scored", per)), int(read_value(sums, "kept", per))
    rows_in = obs.rows_in if obs.rows_in is not None else scored
    lines = [what]
    t = read_value(sums, "threshold", per)
    if t is not None:
        tie = ", rows scoring exactly the threshold split by content hash" if sums.get(f"{DIST}tie") else ""
        lines.append(f"**threshold:** {t:.6g} (rows scoring {'>=' if larger else '<='} it kept{tie})")
    lines.append(f"**kept:** {share(kept, rows_in)}")
    if rows_in > scored:
        lines.append(f"**rows without a score** (null or NaN, never kept): {rows_in - scored:,}")
    lines = [line + "  " for line in lines]  # markdown line breaks
    bins = int(read_value(sums, "bins", per) or 0)
    if not bins:
        return Report(title=title, markdown="\n".join(lines))
    edges = [read_value(sums, f"edge:{i:02d}", per) for i in range(bins + 1)]
    mark = read_value(sums, "mark", per)
    return histogram_report(
        title, edges, read_bins(sums, bins, "bin", per), kept=read_bins(sums, bins, "kept", per),
        mark=None if mark is None else int(mark), lines=lines,
    )


class FilterByRatioParams(NodeParams):
    column: str
    comparison: Literal["larger", "smaller", ">", "<"] = "larger"
    keep_ratio: float = Field(0.1, ge=0.0, le=1.0)
    quantile_error: float = Field(1e-4, ge=0.0, lt=1.0)


@register
class FilterByRatio(Node):
    """Keep the top (``larger``) or bottom (``smaller``) ``keep_ratio`` of the
    rows by ``column``.

    The threshold is an exact rank threshold in (score, content hash) space
    found by histogram refinement; refinement stops as soon as the kept count
    is within ``quantile_error`` x N rows of ``keep_ratio`` x N (0 = exact).
    Ties are therefore broken by the row's content hash: deterministic and
    independent of the block layout. Rows whose score is null or NaN are
    never kept and are not counted in N. The output keeps the input order.
    """

    type_name = "FilterByRatio"
    Params = FilterByRatioParams

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        p = self.params
        require_column(self, stream.schema, p.column, param="column", kind="numeric", path=True)
        mat = keyed(self, stream, p.column, larger=self._larger(), keys=False)
        ratio = p.keep_ratio
        ds = keep_top(
            self,
            mat,
            lambda n: int(math.floor(ratio * n + 0.5)),
            lambda n: p.quantile_error * n,
            ctx,
            f"{p.comparison} {ratio:g} of {p.column!r}",
            larger=self._larger(),
        )
        return Stream(ds, stream.schema)

    def _larger(self) -> bool:
        return self.params.comparison in ("larger", ">")

    def report(self, obs: Observation) -> Report | None:
        p = self.params
        what = f"**column:** `{p.column}`, keeping the {'largest' if self._larger() else 'smallest'} {p.keep_ratio:g} of the rows"
        return selection_report(obs, f"Distribution of {p.column}", what, self._larger())


class SelectorParams(NodeParams):
    num_rows: int | None = Field(None, ge=0)
    selection_ratio: float | None = Field(None, gt=0.0, le=1.0)
    method: Literal["random", "fast_random", "head", "tail", "approximate"] = "random"
    num_partitions: int = Field(32, ge=1)
    seed: int | None = None
    approximate: bool = False
    score_col: str | None = None


@register
class Selector(Node):
    """Select rows by count (``num_rows``) or fraction (``selection_ratio``).

    * ``random``: a uniform random sample. With a ratio, each row is kept
      with that probability (one streaming pass, order preserved); with
      ``num_rows``, exactly that many rows (the rows with the smallest seeded
      hash; one materialization, order preserved).
    * ``fast_random``: a Bernoulli sample of expected size (with ``num_rows``
      the probability is num_rows / N, N counted once): cheaper, approximate.
    * ``head``: the first N rows; ``tail``: the rows after the first N.
      With a ratio, N = ratio x row count.
    * ``approximate`` (with ``score_col``): the top N rows by ``score_col``,
      output sorted descending; ties broken by content hash.

    ``method`` alone picks the selection: the ``approximate`` flag (which
    older recipes set to allow ``method: approximate``) never turns another
    method into a top-N by score. ``num_partitions`` and ``approximate`` are
    accepted without effect.
    """

    type_name = "Selector"
    Params = SelectorParams
    without_effect: ClassVar[dict[str, str]] = {
        "num_partitions": "Ray Data partitions the data",
        "approximate": "method alone picks the selection",
    }

    @classmethod
    def validate_params(cls, p: SelectorParams) -> list[str]:
        problems = []
        if (p.num_rows is None) == (p.selection_ratio is None):
            problems.append("give exactly one of num_rows or selection_ratio")
        if p.method == "approximate" and not p.score_col:
            problems.append("method 'approximate' needs score_col")
        return problems

    def _count(self, n_total: int) -> int:
        p = self.params
        if p.num_rows is not None:
            return min(p.num_rows, n_total)
        return int(math.floor(p.selection_ratio * n_total + 0.5))

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        p = self.params
        seed = ctx.node_seed(p.seed, self.path)
        log_without_effect(self)
        method = p.method
        if method == "approximate":
            require_column(self, stream.schema, p.score_col, param="score_col", kind="numeric", path=True)
            return self._top_by_score(stream, ctx)
        if method == "head":
            if p.num_rows is not None:
                ds = stream.ds.limit(p.num_rows)
            else:
                mat = stream.ds.materialize()
                ds = mat.limit(self._count(mat.count()))
            return Stream(self.tap(ds, ctx), stream.schema)
        if method == "tail":
            mat = stream.ds.materialize()
            total = mat.count()
            first = min(self._count(total), total)
            ds = mat.split_at_indices([first])[1] if first else mat
            return Stream(self.tap(ds, ctx), stream.schema)
        if method == "random" and p.num_rows is not None:
            mat = keyed(self, stream, None, seed=seed)
            ds = keep_top(self, mat, lambda n: min(p.num_rows, n), 0, ctx, f"random {p.num_rows} rows")
            return Stream(ds, stream.schema)
        # Bernoulli: random with a ratio, fast_random either way.
        ds = stream.ds
        if p.num_rows is not None:
            ds = ds.materialize()
            total = ds.count()
            prob = 1.0 if total == 0 else min(1.0, p.num_rows / total)
        else:
            prob = p.selection_ratio

        def bernoulli(batch: pa.Table) -> pa.Table:
            u = uniform(row_hash(batch), seed, 2)
            return batch.filter(pa.array(u < prob))

        ds = ds.map_batches(self.batch_fn(bernoulli, ctx), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        return Stream(ds, stream.schema)

    def _top_by_score(self, stream: Stream, ctx: RunContext) -> Stream:
        p = self.params
        mat = keyed(self, stream, p.score_col, larger=True)
        what = f"top {p.num_rows if p.num_rows is not None else p.selection_ratio} by {p.score_col!r}"
        top = keep_top(self, mat, self._count, 0, ctx, what, drop=False, larger=True)
        # Descending by score, ties by content hash.
        ds = top.sort([S_COL, H_COL], descending=[True, True])
        ds = ds.map_batches(drop_internal, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        return Stream(ds, stream.schema)

    def report(self, obs: Observation) -> Report | None:
        p = self.params
        if p.method != "approximate":
            return None  # no score: nothing to show beyond the row counts
        top = f"{p.num_rows:,} rows" if p.num_rows is not None else f"{p.selection_ratio:g} of the rows"
        what = f"**score_col:** `{p.score_col}`, keeping the top {top}"
        return selection_report(obs, f"Distribution of {p.score_col}", what, larger=True)
