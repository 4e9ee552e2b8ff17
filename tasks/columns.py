"""Column nodes (SPEC §5): pure Arrow batch functions."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tasks._models import with_column
from tasks.base import BatchNode, NodeParams, register
from tasks.checks import require_columns


class ColumnSelectParams(NodeParams):
    select_cols: list[str]


@register
class ColumnSelect(BatchNode):
    """Keep these columns in this order; a missing column is an error."""

    type_name = "ColumnSelect"
    Params = ColumnSelectParams

    def transform(self, batch: pa.Table) -> pa.Table:
        require_columns(self, batch.schema, self.params.select_cols, param="select_cols")
        return batch.select(self.params.select_cols)


class ColumnDropParams(NodeParams):
    drop_cols: list[str] | str


@register
class ColumnDrop(BatchNode):
    """Drop columns; absent ones are ignored."""

    type_name = "ColumnDrop"
    Params = ColumnDropParams

    def transform(self, batch: pa.Table) -> pa.Table:
        cols = self.params.drop_cols
        cols = [cols] if isinstance(cols, str) else cols
        return batch.drop_columns([c for c in cols if c in batch.column_names])


class ColumnAliasParams(NodeParams):
    input_col: str
    output_col: str


@register
class ColumnAlias(BatchNode):
    """Rename a column; an absent column is a no-op."""

    type_name = "ColumnAlias"
    Params = ColumnAliasParams

    def transform(self, batch: pa.Table) -> pa.Table:
        src, dst = self.params.input_col, self.params.output_col
        if src not in batch.column_names or src == dst:
            return batch
        if dst in batch.column_names:
            batch = batch.drop_columns([dst])
        return batch.rename_columns([dst if n == src else n for n in batch.column_names])


class AddConstantsParams(NodeParams):
    constant_list: list[Any]
    column_list: list[str]


@register
class AddConstants(BatchNode):
    """Add literal columns (replacing same-named ones)."""

    type_name = "AddConstants"
    Params = AddConstantsParams

    @classmethod
    def validate_params(cls, p: AddConstantsParams) -> list[str]:
        if len(p.constant_list) != len(p.column_list):
            return [
                f"constant_list has {len(p.constant_list)} values but column_list has {len(p.column_list)} names"
            ]
        for value in p.constant_list:
            if isinstance(value, (dict, list)):
                return [f"constant_list: {value!r} is not a scalar"]
        return []

    def transform(self, batch: pa.Table) -> pa.Table:
        for name, value in zip(self.params.column_list, self.params.constant_list):
            scalar = pa.scalar(value)
            if pa.types.is_integer(scalar.type):
                scalar = pa.scalar(value, pa.int64())
            batch = with_column(batch, name, pa.array([value] * batch.num_rows, type=scalar.type))
        return batch


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings with nulls as empty (non-string scalars are cast to text)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    return pc.fill_null(column, "")


class ConcatenateColumnsParams(NodeParams):
    input_cols: list[str]
    output_col: str
    separator: str = " "


@register
class ConcatenateColumns(BatchNode):
    """Join string columns with a separator, nulls as empty, strip the result."""

    type_name = "ConcatenateColumns"
    Params = ConcatenateColumnsParams

    def transform(self, batch: pa.Table) -> pa.Table:
        p = self.params
        parts = [_as_text(batch.column(c)) for c in p.input_cols]
        joined = pc.binary_join_element_wise(*parts, p.separator)
        joined = pc.utf8_trim_whitespace(joined)
        return with_column(batch, p.output_col, joined)


class ConcatParams(NodeParams):
    select_cols: list[str]
    output_col: str


@register
class Concat(BatchNode):
    """Concatenate columns with no separator, nulls as empty."""

    type_name = "Concat"
    Params = ConcatParams

    def transform(self, batch: pa.Table) -> pa.Table:
        p = self.params
        parts = [_as_text(batch.column(c)) for c in p.select_cols]
        return with_column(batch, p.output_col, pc.binary_join_element_wise(*parts, ""))
