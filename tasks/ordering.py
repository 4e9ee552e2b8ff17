"""Ordering nodes (SPEC §6): global, distributed, seeded."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.base import Node, NodeParams, Observation, Report, RunContext, Stream, register
from tasks.checks import log_without_effect, require_column, require_columns
from tasks.reports import DIST, metrics_context
from tasks.rowkeys import add_positions, block_reduce, drop_internal, named, numeric_values, row_hash, seeded, uniform

# Every sort ends with a content-hash key (seeded when a random tiebreak is
# asked for), so ties come out in the same order whatever the block layout;
# Ray Data sorts by range partitioning (sampled boundaries), never on the
# driver.

_H, _POS, _FOLD = "__kf_h", "__kf_pos", "__kf_fold"
_GROUP, _SCORE, _RESCALED, _TIEBREAK = "__kf_g", "__kf_s", "__kf_r", "__kf_t"


def _as_list(v):
    return [v] if isinstance(v, (str, bool)) else list(v)


def _map(ds, fn):
    """``fn`` over whole blocks as Arrow tables."""
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def _drop(ds):
    return _map(ds, drop_internal)


def _positioned(ds):
    """The input numbered 0..N-1 in input order (``_POS``): positions, unlike
    block indices, are the same whatever the block count."""
    numbered, _ = add_positions(ds.materialize(), _POS)
    return numbered


class ShufflerParams(NodeParams):
    seed: int | None = None


@register
class Shuffler(Node):
    """Global random shuffle, seeded (node seed, else derived from the run
    seed): a sort by a seeded hash of each row's position in the input, so
    the same input rows in the same order give the same output whatever the
    block count, and repeated rows are spread apart like any others."""

    type_name = "Shuffler"
    Params = ShufflerParams

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        seed = ctx.node_seed(self.params.seed, self.path)

        def add_key(batch: pa.Table) -> pa.Table:
            key = seeded(batch.column(_POS).to_numpy().astype(np.uint64), seed, 5)
            return batch.drop_columns([_POS]).append_column(_H, pa.array(key, pa.uint64()))

        ds = _map(_positioned(stream.ds), named(self, add_key))
        ds = _drop(ds.sort(_H))
        return Stream(self.tap(ds, ctx), stream.schema)


class ReorderParams(NodeParams):
    score_cols: list[str] | str
    ascending: list[bool] | bool = True
    use_random_tiebreaker: bool = False
    approximate: bool = False
    num_partitions: int = Field(32, ge=1)
    folding: int = Field(1, ge=1)
    seed: int | None = None


@register
class Reorder(Node):
    """Global multi-key sort by ``score_cols`` (``ascending`` per key, or one
    value for all). ``folding > 1`` puts (input row position mod folding)
    first, giving ``folding`` interleaved sorted runs; ``use_random_tiebreaker``
    adds a seeded random last key (else ties are ordered by content hash).
    The sort is Ray Data's distributed range-partitioned sort, which is
    already what ``approximate`` allows; ``num_partitions`` is accepted
    without effect."""

    type_name = "Reorder"
    Params = ReorderParams
    without_effect: ClassVar[dict[str, str]] = {"num_partitions": "Ray Data's sort chooses its range partitions"}

    @classmethod
    def validate_params(cls, p: ReorderParams) -> list[str]:
        problems = []
        keys, asc = _as_list(p.score_cols), _as_list(p.ascending)
        if not keys:
            problems.append("score_cols must name at least one column")
        if len(asc) not in (1, len(keys)):
            problems.append(f"ascending has {len(asc)} values for {len(keys)} score_cols")
        return problems

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        p = self.params
        log_without_effect(self)
        keys = _as_list(p.score_cols)
        asc = _as_list(p.ascending)
        asc = asc * len(keys) if len(asc) == 1 else asc
        require_columns(self, stream.schema, keys, param="score_cols")
        seed = ctx.node_seed(p.seed, self.path) if p.use_random_tiebreaker else None
        folding = p.folding
        ds = stream.ds
        if folding > 1:
            ds = _positioned(ds)

        def add_keys(batch: pa.Table) -> pa.Table:
            h = row_hash(batch)
            if seed is not None:
                h = seeded(h, seed, 4)
            if folding > 1:
                pos = batch.column(_POS).to_numpy()
                batch = batch.drop_columns([_POS]).append_column(_FOLD, pa.array(pos % folding, pa.int64()))
            return batch.append_column(_H, pa.array(h, pa.uint64()))

        ds = _map(ds, named(self, add_keys))
        sort_keys = ([_FOLD] if folding > 1 else []) + keys + [_H]
        descending = ([False] if folding > 1 else []) + [not a for a in asc] + [False]
        ds = _drop(ds.sort(sort_keys, descending=descending))
        return Stream(self.tap(ds, ctx), stream.schema)


class InterleavedReorderParams(NodeParams):
    group_col: str
    type_num: int = Field(ge=1)
    score_cols: list[str] | str
    ascending: bool = True
    perturb: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    seed: int | None = None


RANDOM_SCORE = "__random__"


@register
class InterleavedReorder(Node):
    """Curriculum mixing. Group g (``group_col`` = g, an integer in
    [0, type_num)) is ranked by ``score_cols[g]`` (``__random__``: a seeded
    random key of the row's content; a null/NaN score ranks as the worst);
    its rank r (1..n_g) is rescaled to r / n_g x N, plus ``perturb`` x
    U[0,1), and the whole dataset is sorted by that with a seeded random
    tiebreak. Every group is spread evenly over the output in its own
    quality order and ends at N; with ``ascending: true`` the best rows come
    last.

    Distributed: one materialization, group sizes from per-block counts, a
    range-partitioned sort by (group, score), row positions from block row
    counts, and a second sort by the rescaled rank."""

    type_name = "InterleavedReorder"
    Params = InterleavedReorderParams

    def _scores(self) -> list[str]:
        cols = _as_list(self.params.score_cols)
        return cols * self.params.type_num if len(cols) == 1 else cols

    @classmethod
    def validate_params(cls, p: InterleavedReorderParams) -> list[str]:
        n = len(_as_list(p.score_cols))
        if n not in (1, p.type_num):
            return [f"score_cols has {n} entries but type_num is {p.type_num} (one per group)"]
        return []

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        self._check_columns(stream.schema)
        seed = ctx.node_seed(self.params.seed, self.path)
        type_num = self.params.type_num
        mat = _map(stream.ds, named(self, self._group_and_score(seed))).materialize()
        sizes = block_reduce(
            mat,
            lambda b: np.bincount(b.column(_GROUP).to_numpy(), minlength=type_num),
            lambda a, b: a + b,
            np.zeros(type_num, np.int64),
            self,
        )
        ranked = mat.sort([_GROUP, _SCORE, _H], descending=[False, not self.params.ascending, False])
        ranked, _ = add_positions(ranked, _POS)
        ds = _map(ranked, named(self, self._rescaled_rank(sizes, seed)))
        ds = _drop(ds.sort([_RESCALED, _TIEBREAK]))
        return Stream(self.tap(ds, ctx), stream.schema)

    def _check_columns(self, schema: pa.Schema) -> None:
        p = self.params
        gfield = require_column(self, schema, p.group_col, param="group_col")
        if not (pa.types.is_integer(gfield.type) or pa.types.is_floating(gfield.type)):
            raise self.error(f"group_col {p.group_col!r} is {gfield.type}; it must hold the group number 0..{p.type_num - 1}")
        for col in sorted(set(self._scores()) - {RANDOM_SCORE}):
            require_column(self, schema, col, param="score_cols", kind="numeric", path=True)

    def _group_and_score(self, seed: int):
        """Batch function: each row's group (``_GROUP``), its score in its
        group's column (``_SCORE``; null/NaN as the worst) and content hash."""
        scores, type_num, group_col = self._scores(), self.params.type_num, self.params.group_col
        worst = -np.inf  # sorts first ascending, last descending: always the worst rank

        def add_keys(batch: pa.Table) -> pa.Table:
            h = row_hash(batch)
            graw = batch.column(group_col)
            if graw.null_count:
                raise ValueError(f"group_col {group_col!r} has null values")
            g = graw.cast(pa.float64()).to_numpy()
            bad = (g != np.floor(g)) | (g < 0) | (g >= type_num)
            if bad.any():
                raise ValueError(f"group_col {group_col!r} has value {g[bad][0]!r}, outside 0..{type_num - 1}")
            g = g.astype(np.int64)
            s = np.full(batch.num_rows, worst)
            for gi in np.unique(g):
                sel = g == gi
                col = scores[gi]
                vals = uniform(h[sel], seed, 7) if col == RANDOM_SCORE else numeric_values(batch, col)[sel]
                s[sel] = np.where(np.isnan(vals), worst, vals)
            return batch.append_column(_GROUP, pa.array(g)).append_column(_SCORE, pa.array(s)).append_column(
                _H, pa.array(h, pa.uint64())
            )

        return add_keys

    def _rescaled_rank(self, sizes: np.ndarray, seed: int):
        """Batch function over rows ranked within their group: the rank
        rescaled to the whole dataset (``_RESCALED``, plus the perturbation)
        and a seeded tiebreak (``_TIEBREAK``)."""
        total, perturb = int(sizes.sum()), self.params.perturb
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

        def rescale(batch: pa.Table) -> pa.Table:
            g = batch.column(_GROUP).to_numpy()
            h = batch.column(_H).to_numpy()
            rank = batch.column(_POS).to_numpy() - starts[g] + 1
            r = rank / np.maximum(sizes[g], 1) * total
            if perturb:
                r = r + perturb * uniform(h, seed, 8)
            batch = batch.drop_columns([_GROUP, _SCORE, _POS, _H])
            return batch.append_column(_RESCALED, pa.array(r, pa.float64())).append_column(
                _TIEBREAK, pa.array(seeded(h, seed, 9), pa.uint64())
            )

        return rescale


class AddRankQuantileParams(NodeParams):
    score_col: str
    add_rank: bool = True
    add_quantile: bool = True
    ascending: bool = False
    require_sorted: bool = True


@register
class AddRankQuantile(Node):
    """Sort by ``score_col`` (descending unless ``ascending``; nulls/NaN last,
    ties by content hash) and add ``rank`` = 1..N (int64) and ``quantile`` =
    rank / N (float64). The output is always in rank order, so
    ``require_sorted`` holds either way."""

    type_name = "AddRankQuantile"
    Params = AddRankQuantileParams

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        p = self.params
        require_column(self, stream.schema, p.score_col, param="score_col", kind="numeric", path=True)
        col, asc = p.score_col, p.ascending
        last = np.inf if asc else -np.inf

        def add_keys(batch: pa.Table) -> pa.Table:
            s = numeric_values(batch, col)
            s = np.where(np.isnan(s), last, s)
            return batch.append_column(_SCORE, pa.array(s)).append_column(_H, pa.array(row_hash(batch), pa.uint64()))

        ds = _map(stream.ds, named(self, add_keys))
        ds, total = add_positions(ds.sort([_SCORE, _H], descending=[not asc, False]), _POS)
        add_rank, add_quantile = p.add_rank, p.add_quantile
        quantile_scores = self._quantile_scores(total, ctx)

        def ranks(batch: pa.Table) -> pa.Table:
            rank = batch.column(_POS).to_numpy() + 1
            quantile_scores(batch, rank)
            batch = drop_internal(batch)
            for name in ("rank", "quantile"):
                if name in batch.column_names and ((name == "rank" and add_rank) or (name == "quantile" and add_quantile)):
                    batch = batch.drop_columns([name])
            if add_rank:
                batch = batch.append_column("rank", pa.array(rank, pa.int64()))
            if add_quantile:
                batch = batch.append_column("quantile", pa.array(rank / max(total, 1), pa.float64()))
            return batch

        ds = _map(ds, named(self, ranks))
        schema = stream.schema
        for name, on, t in (("rank", add_rank, pa.int64()), ("quantile", add_quantile, pa.float64())):
            if on:
                if name in schema.names:
                    schema = schema.remove(schema.get_field_index(name))
                schema = schema.append(pa.field(name, t))
        return Stream(self.tap(ds, ctx), schema)

    # The report: the score at every 1/QUANTILES of the ranks. (The quantile
    # column itself is uniform by construction; its histogram says nothing.)
    QUANTILES: ClassVar[int] = 20

    def _quantile_scores(self, total: int, ctx: RunContext):
        """Batch function part: the batches holding the ranks at the
        quantile points (rank max(1, ceil(i x N / QUANTILES)), i = 0..
        QUANTILES) send those rows' scores, each exactly once, as
        ``dist:q:II`` (``dist:qx:II``: 0 null/NaN, +-1 infinite); the
        batch holding rank 1 also sends N and ``dist:reports`` = 1 (a node
        task run twice sent everything twice). No batch reads anything more."""
        q = self.QUANTILES
        at: dict[int, list[int]] = {}
        for i in range(q + 1):
            at.setdefault(max(1, math.ceil(i * total / q)), []).append(i)
        points = np.array(sorted(at), dtype=np.int64)
        col, node, mctx = self.params.score_col, self, metrics_context(ctx)

        def send(batch: pa.Table, rank: np.ndarray) -> None:
            hit = np.flatnonzero(np.isin(rank, points))
            if not len(hit):
                return
            values = numeric_values(batch, col)
            sums = {f"{DIST}rows": float(total), f"{DIST}reports": 1.0} if 1 in rank[hit] else {}
            for row in hit:
                v = float(values[row])
                for i in at[int(rank[row])]:
                    if math.isfinite(v):
                        sums[f"{DIST}q:{i:02d}"] = v
                    else:
                        sums[f"{DIST}qx:{i:02d}"] = 0.0 if math.isnan(v) else math.copysign(1.0, v)
            node.report_metrics(mctx, sums)

        return send

    def report(self, obs: Observation) -> Report | None:
        sums, q, p = obs.sums, self.QUANTILES, self.params
        per = sums.get(f"{DIST}reports")
        if not per:
            return None
        total = int(round(sums[f"{DIST}rows"] / per))
        points = [max(1, math.ceil(i * total / q)) for i in range(q + 1)]
        values: list[float | None] = []
        for i in range(q + 1):
            code = sums.get(f"{DIST}qx:{i:02d}")
            v = sums.get(f"{DIST}q:{i:02d}")
            v = None if v is None else v / per
            values.append(v if v is not None else None if code is None or code == 0.0 else math.copysign(math.inf, code))
        finite = [v for v in values if v is not None and math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        order = "ascending" if p.ascending else "descending"
        lines = [
            f"**score_col:** `{p.score_col}`, ranked {order} (rank 1 = the {'smallest' if p.ascending else 'largest'}); "
            f"{total:,} rows  ",
            f"Score at every {100 // q}% of the ranks (the bar: the score between the smallest and the largest shown)",
            "",
            "| quantile | rank | score | |",
            "| ---: | ---: | ---: | --- |",
        ]
        table = []
        for rank, v in zip(points, values):
            bar = ""
            if v is not None and math.isfinite(v):
                bar = "█" * max(1, round(30 * (v - lo) / (hi - lo))) if hi > lo else "█" * 30
            shown = "null" if v is None else f"{v:.6g}"
            lines.append(f"| {rank / total:.4g} | {rank:,} | {shown} | {bar} |")
            table.append({"quantile": rank / total, "rank": rank, "score": None if v is None or not math.isfinite(v) else v})
        return Report(title=f"Distribution of {p.score_col}", markdown="\n".join(lines), table=table)
