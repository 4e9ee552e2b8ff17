"""Sampling and exploding nodes (SPEC §6): DuplicateSampleRatio, Sampler,
Flatten, GroupFlatten.

All four are pure per-block Arrow functions (they stream; nothing is
collected). Sampler's randomness is a seeded mix of each row's content hash
(``tasks.rowkeys``), so the draw is the same whatever the block count.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tasks._models import with_column
from tasks.base import BatchNode, NodeParams, RunContext, Stream, register
from tasks.checks import is_numeric, require_column
from tasks.rowkeys import row_hash, uniform


def _column(node, batch: pa.Table, name: str, kind: str | None = None) -> pa.ChunkedArray:
    require_column(node, batch.schema, name, param="col", kind=kind)
    return batch.column(name)


def _numeric(node, batch: pa.Table, name: str) -> np.ndarray:
    """float64 values of a numeric column (nulls as NaN); non-numeric is an error."""
    col = _column(node, batch, name, "numeric")
    return pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy()


class DuplicateSampleRatioParams(NodeParams):
    col: str = "duplicate_count"
    global_sample_rate: float = Field(0.1, ge=0.0, allow_inf_nan=False)
    max_sample: float = Field(20.0, ge=0.0)


@register
class DuplicateSampleRatio(BatchNode):
    """``col = min(col * global_sample_rate, max_sample)`` as float64. Values
    that are not numbers (null, NaN, text that does not parse as a number)
    become 0."""

    type_name = "DuplicateSampleRatio"
    Params = DuplicateSampleRatioParams

    def transform(self, batch: pa.Table) -> pa.Table:
        p = self.params
        col = _column(self, batch, p.col)
        if is_numeric(col.type):
            values = pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy()
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            # Text: parse what parses, the rest is 0.
            values = np.array([_to_float(v) for v in col.to_pylist()], dtype=np.float64)
        else:
            values = np.zeros(batch.num_rows)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        out = np.minimum(values * p.global_sample_rate, p.max_sample)
        return with_column(batch, p.col, pa.array(out, pa.float64()))


def _to_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


class SamplerParams(NodeParams):
    col: str = "duplicate_count"
    seed: int | None = None


@register
class Sampler(BatchNode):
    """``col = floor(v) + Bernoulli(frac(v))`` as int64; rows that end at 0
    are dropped. Null, NaN and negative values count as 0. The Bernoulli draw
    is a seeded function of the row's content, so it does not depend on the
    block layout (identical rows draw alike)."""

    type_name = "Sampler"
    Params = SamplerParams

    _seed: int = 0

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        self._seed = ctx.node_seed(self.params.seed, self.path)
        return super().apply(inputs, ctx)

    def transform(self, batch: pa.Table) -> pa.Table:
        name = self.params.col
        v = _numeric(self, batch, name)
        v = np.where(np.isfinite(v) & (v > 0), v, 0.0)
        whole = np.floor(v)
        frac = v - whole
        u = uniform(row_hash(batch), self._seed, 3) if batch.num_rows else np.zeros(0)
        count = (whole + (u < frac)).astype(np.int64)
        out = with_column(batch, name, pa.array(count, pa.int64()))
        return out.filter(pa.array(count > 0))


class FlattenParams(NodeParams):
    col: str = "duplicate_count"


@register
class Flatten(BatchNode):
    """Repeat each row ``col`` times (floor of the value; null, NaN and
    values <= 0 give no row), then drop ``col``. List and struct columns are
    repeated intact."""

    type_name = "Flatten"
    Params = FlattenParams

    def transform(self, batch: pa.Table) -> pa.Table:
        name = self.params.col
        v = _numeric(self, batch, name)
        v = np.where(np.isfinite(v) & (v > 0), np.floor(v), 0).astype(np.int64)
        idx = np.repeat(np.arange(batch.num_rows, dtype=np.int64), v)
        return batch.drop_columns([name]).take(pa.array(idx))


class GroupFlattenParams(NodeParams):
    cols: list[str] | str
    sub_cols: list[str] | str | None = None
    output_cols: list[str] | str | None = None


def _as_list(v) -> list[str] | None:
    return [v] if isinstance(v, str) else (list(v) if v is not None else None)


@register
class GroupFlatten(BatchNode):
    """Explode several parallel list columns together: one output row per
    element index, up to the longest list of the row (shorter lists give
    null). ``sub_cols`` (default ``cols``) pick what goes out: a list column
    itself (its element) or a dotted path into its struct elements
    (``conversation.content``); ``output_cols`` (default ``sub_cols``, dots
    kept as written) name the results. The exploded list columns are dropped;
    other columns repeat. Rows whose lists are all empty or null give no row
    (like Spark's explode)."""

    type_name = "GroupFlatten"
    Params = GroupFlattenParams

    def _names(self):
        p = self.params
        cols = _as_list(p.cols)
        subs = _as_list(p.sub_cols) or cols
        outs = _as_list(p.output_cols) or subs
        return cols, subs, outs

    @classmethod
    def validate_params(cls, p) -> list[str]:
        cols = _as_list(p.cols)
        subs = _as_list(p.sub_cols) or cols
        outs = _as_list(p.output_cols) or subs
        problems = []
        if not cols:
            problems.append("cols must name at least one list column")
        if len(outs) != len(subs):
            problems.append(f"output_cols has {len(outs)} names but sub_cols has {len(subs)}")
        for sub in subs:
            if not any(sub == c or sub.startswith(c + ".") for c in cols):
                problems.append(f"sub_cols entry {sub!r} is not one of cols or a path under one ({', '.join(cols)})")
        return problems

    def transform(self, batch: pa.Table) -> pa.Table:
        cols, subs, outs = self._names()
        n = batch.num_rows
        arrays, lengths = {}, {}
        for c in cols:
            require_column(self, batch.schema, c, param="cols", kind="list")
            col = batch.column(c)
            arr = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
            if col.num_chunks == 0:
                arr = pa.array([], type=col.type)
            arrays[c] = arr
            lengths[c] = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        longest = np.max(np.stack([lengths[c] for c in cols]), axis=0) if n else np.zeros(0, np.int64)
        parent = np.repeat(np.arange(n, dtype=np.int64), longest)
        starts_out = np.concatenate([[0], np.cumsum(longest)[:-1]]) if n else np.zeros(0, np.int64)
        elem = np.arange(len(parent), dtype=np.int64) - np.repeat(starts_out, longest)
        out = batch.drop_columns(cols).take(pa.array(parent))
        for sub, name in zip(subs, outs):
            root = max((c for c in cols if sub == c or sub.startswith(c + ".")), key=len)
            rest = sub[len(root) + 1 :].split(".") if sub != root else []
            arr, lens = arrays[root], lengths[root]
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if n else np.zeros(0, np.int64)
            inside = elem < lens[parent]
            idx = pa.array(np.where(inside, starts[parent] + elem, 0), mask=~inside)
            values = arr.flatten().take(idx)
            for part in rest:
                if not pa.types.is_struct(values.type):
                    raise self.error(f"sub_cols {sub!r}: elements of {root!r} are {values.type}, not structs with {part!r}")
                values = pc.struct_field(values, part)
            out = with_column(out, name, values)
        return out
