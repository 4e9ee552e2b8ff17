"""Arrow schema helpers shared by readers and union nodes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def unify_by_name(schemas: list[pa.Schema]) -> pa.Schema:
    """Union of fields in first-seen order; types promoted where Arrow can
    (int -> float, null -> anything, large/small strings)."""
    return pa.unify_schemas(
        [s.remove_metadata() for s in schemas], promote_options="permissive"
    )


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder/cast ``batch`` to ``schema``; absent columns become nulls."""
    columns = []
    for field in schema:
        if field.name in batch.column_names:
            col = batch.column(field.name)
            if col.type != field.type:
                col = col.cast(field.type)
            columns.append(col)
        else:
            columns.append(pa.nulls(batch.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def get_path(table: pa.Table, dotted: str) -> pa.ChunkedArray:
    """Column by dotted path into struct fields (``metadata.score``)."""
    head, *rest = dotted.split(".")
    col = table.column(head)
    for part in rest:
        col = pc.struct_field(col, part)
    return col


def field_at(schema: pa.Schema, dotted: str) -> pa.Field:
    head, *rest = dotted.split(".")
    field = schema.field(head)
    for part in rest:
        if not pa.types.is_struct(field.type):
            raise KeyError(f"{dotted!r}: {field.name!r} is not a struct")
        field = field.type.field(part)
    return field
