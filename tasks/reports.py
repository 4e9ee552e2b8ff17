"""Reporting nodes (SPEC §5): pass the data through and report on it.

They observe the stream as it flows to the root (row count, first rows,
schema) instead of computing anything themselves, so reporting never makes
the pipeline compute twice. The flow turns ``report()`` into log lines and
Prefect artifacts.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from tasks.base import BatchNode, NodeParams, Observation, Observe, Report, register


def _cell(value, width: int = 80) -> str:
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(table: pa.Table, width: int = 80) -> str:
    names = table.column_names
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in table.to_pylist():
        lines.append("| " + " | ".join(_cell(row[n], width) for n in names) + " |")
    return "\n".join(lines)


def vertical_rows(table: pa.Table, width: int = 200) -> str:
    blocks = []
    for i, row in enumerate(table.to_pylist()):
        body = "\n".join(f"{k}: {_cell(v, width)}" for k, v in row.items())
        blocks.append(f"-RECORD {i}-\n{body}")
    return "\n".join(blocks)


def schema_text(schema: pa.Schema | None) -> str:
    if schema is None:
        return "(schema unknown)"
    return "\n".join(f"- {f.name}: {f.type}{'' if f.nullable else ' (not null)'}" for f in schema)


def json_rows(table: pa.Table, width: int = 200) -> list[dict]:
    """Rows as JSON-safe dicts for a table artifact (long values cut)."""
    return [{k: _cell(v, width) for k, v in row.items()} for row in table.to_pylist()]


class _PassThrough(BatchNode):
    Params = NodeParams
    schema_seen: ClassVar[bool] = True

    def transform(self, batch: pa.Table) -> pa.Table:
        return batch


@register
class Schema(_PassThrough):
    type_name = "Schema"
    observe = Observe(schema=True)

    def report(self, obs: Observation) -> Report:
        return Report(title="Schema", markdown=schema_text(obs.schema))


@register
class Stat(_PassThrough):
    type_name = "Stat"
    observe = Observe(head_rows=20, schema=True)

    def report(self, obs: Observation) -> Report:
        head = obs.head if obs.head is not None else pa.table({})
        md = (
            f"**rows:** {obs.rows_out}\n\n**schema:**\n{schema_text(obs.schema)}\n\n"
            f"**first {head.num_rows} rows:**\n\n{markdown_table(head)}"
        )
        return Report(title="Stat", markdown=md, table=json_rows(head))


@register
class RowNumber(_PassThrough):
    type_name = "Row Number"
    aliases = ("RowNumber",)
    observe = Observe()

    def report(self, obs: Observation) -> Report:
        return Report(title="Row Number", markdown=f"**rows:** {obs.rows_out}")


class VisualizerParams(NodeParams):
    num_rows: int = Field(20, ge=0)
    vertical: bool = False
    truncate: bool | int = True


@register
class Visualizer(_PassThrough):
    type_name = "Visualizer"
    Params = VisualizerParams

    @property
    def observe(self) -> Observe:  # type: ignore[override]
        return Observe(head_rows=self.params.num_rows, schema=True)

    def report(self, obs: Observation) -> Report:
        head = obs.head if obs.head is not None else pa.table({})
        width = 20 if self.params.truncate is True else (10_000 if self.params.truncate is False else int(self.params.truncate))
        text = vertical_rows(head, width) if self.params.vertical else markdown_table(head, width)
        return Report(title=f"Visualizer (first {head.num_rows} rows)", markdown=text, table=json_rows(head, width))
