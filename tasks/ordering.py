"""Ordering nodes (SPEC §6): global, distributed, seeded."""

from __future__ import annotations

from tasks.base import Node, NodeParams, RunContext, Stream, register


class ShufflerParams(NodeParams):
    seed: int | None = None


@register
class Shuffler(Node):
    """Global random shuffle, seeded (node seed, else derived from the run seed)."""

    type_name = "Shuffler"
    Params = ShufflerParams

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        ds = stream.ds.random_shuffle(seed=ctx.node_seed(self.params.seed, self.path))
        return Stream(self.tap(ds, ctx), stream.schema)
