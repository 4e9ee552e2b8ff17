"""Row filters (SPEC §5)."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from tasks.base import BatchNode, NodeParams, register
from tasks.checks import require_column

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
        require_column(self, batch.schema, p.column, param="column", kind="numeric")
        values = batch.column(p.column).cast(pa.float64())
        keep = COMPARE[p.comparison](values, p.threshold)
        keep = pc.and_(pc.fill_null(keep, False), pc.invert(pc.fill_null(pc.is_nan(values), True)))
        return batch.filter(keep)
