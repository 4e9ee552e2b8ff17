"""Row filters (SPEC §5)."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from tasks.base import BatchNode, NodeParams, register

Comparison = Literal["larger", ">", "smaller", "<", "larger_or_equal", ">=", "smaller_or_equal", "<=", "equal", "=="]

COMPARE = {
    "larger": pc.greater,
    ">": pc.greater,
    "smaller": pc.less,
    "<": pc.less,
    "larger_or_equal": pc.greater_equal,
    ">=": pc.greater_equal,
    "smaller_or_equal": pc.less_equal,
    "<=": pc.less_equal,
    "equal": pc.equal,
    "==": pc.equal,
}


def numeric_column(batch: pa.Table, name: str, node) -> pa.ChunkedArray:
    """The column as float64, or a NodeError saying why it cannot be."""
    if name not in batch.column_names:
        raise node.error(f"no column {name!r} (columns: {', '.join(batch.column_names)})")
    col = batch.column(name)
    if pa.types.is_boolean(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type) or pa.types.is_null(col.type):
        return col.cast(pa.float64())
    raise node.error(f"column {name!r} is {col.type}, not numeric")


class FilterParams(NodeParams):
    column: str
    comparison: Comparison = "larger"
    threshold: float = 0.0


@register
class Filter(BatchNode):
    """Keep rows whose numeric column compares to the threshold; null and NaN
    rows never pass."""

    type_name = "Filter"
    Params = FilterParams

    def transform(self, batch: pa.Table) -> pa.Table:
        p = self.params
        values = numeric_column(batch, p.column, self)
        keep = COMPARE[p.comparison](values, p.threshold)
        keep = pc.and_(pc.fill_null(keep, False), pc.invert(pc.fill_null(pc.is_nan(values), True)))
        return batch.filter(keep)
