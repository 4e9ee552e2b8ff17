"""Combining nodes (SPEC §7): unions. Children are combined lazily; each
child's batches are conformed to one schema so the union has one schema."""

from __future__ import annotations

import logging

import pyarrow as pa

from tasks.base import Node, NodeParams, RunContext, Stream, register
from tasks.schema import conform, unify_by_name

log = logging.getLogger("kaiyuan.nodes")


def union_streams(node: Node, streams: list[Stream], schema: pa.Schema, renames: list[list[str] | None], ctx: RunContext) -> Stream:
    datasets = []
    for stream, names in zip(streams, renames):

        def fit(batch: pa.Table, names=names) -> pa.Table:
            if names is not None:
                batch = batch.rename_columns(names)
            return conform(batch, schema)

        datasets.append(stream.ds.map_batches(fit, batch_format="pyarrow", batch_size=None, zero_copy_batch=True))
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    return Stream(node.tap(ds, ctx), schema)


@register
class UnionByPosition(Node):
    """Union; later inputs take the first input's column names by position."""

    type_name = "UnionByPosition"
    Params = NodeParams
    min_children = 1
    max_children = None

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        first = inputs[0].schema
        renames: list[list[str] | None] = [None]
        types = list(first.types)
        for i, stream in enumerate(inputs[1:], start=1):
            if len(stream.schema) != len(first):
                raise self.error(
                    f"child {i} has {len(stream.schema)} columns ({', '.join(stream.schema.names)}) "
                    f"but child 0 has {len(first)} ({', '.join(first.names)})"
                )
            if stream.schema.names != first.names:
                # Swapped columns would silently mix: say so.
                log.warning(
                    "%s: child %d column names %s differ from child 0's %s; joining by position",
                    self.path, i, stream.schema.names, first.names,
                )
            renames.append(list(first.names))
            for j, t in enumerate(stream.schema.types):
                types[j] = unify_by_name([pa.schema([("c", types[j])]), pa.schema([("c", t)])]).field("c").type
        schema = pa.schema([pa.field(n, t) for n, t in zip(first.names, types)])
        return union_streams(self, inputs, schema, renames, ctx)


class UnionByNameParams(NodeParams):
    allow_missing_columns: bool = False


@register
class UnionByName(Node):
    """Union by column name; with ``allow_missing_columns`` missing columns
    are filled with null (first-seen column order)."""

    type_name = "UnionByName"
    Params = UnionByNameParams
    min_children = 1
    max_children = None

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        schema = unify_by_name([s.schema for s in inputs])
        if not self.params.allow_missing_columns:
            for i, stream in enumerate(inputs):
                missing = [n for n in schema.names if n not in stream.schema.names]
                if missing:
                    raise self.error(
                        f"child {i} lacks column(s) {', '.join(missing)}; set allow_missing_columns: true to fill them with null"
                    )
        return union_streams(self, inputs, schema, [None] * len(inputs), ctx)
