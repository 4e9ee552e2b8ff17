"""Reporting nodes (SPEC §5): pass the data through and report on it.

They observe the stream as it flows to the root (row count, first rows,
schema) instead of computing anything themselves, so reporting never makes
the pipeline compute twice. The flow turns ``report()`` into log lines and
Prefect artifacts.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterable, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.base import BatchNode, NodeParams, Observation, Observe, Report, RunContext, register


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


# ---------------------------------------------------------------------------
# Score distributions (selection, ranking and scoring nodes).
#
# Nodes publish a distribution through ``Node.report_metrics``: named sums,
# added up over calls. Counts per bin are sums by nature, so a batch function
# can send its own batch's counts and the run's totals are exact. Values that
# are not counts (bin edges, the threshold) are sent once, by the driver,
# together with ``dist:reports`` = 1, so a node task that ran twice (a retry)
# still reads back one histogram.

DIST = "dist:"
DISPLAY_BINS = 32
_EIGHTHS = " ▏▎▍▌▋▊▉"
_BAR_WIDTH = 30


def metrics_context(ctx: RunContext) -> RunContext:
    """The part of ``ctx`` that ``report_metrics`` needs: batch functions
    carry this to the workers, never the run's storage credentials."""
    return RunContext(stats_actor=ctx.stats_actor, ray_namespace=ctx.ray_namespace)


def bin_sums(counts: Iterable[float], name: str = "bin") -> dict[str, float]:
    """``dist:<name>:NN`` for every non-zero bin (absent = 0)."""
    return {f"{DIST}{name}:{i:02d}": float(c) for i, c in enumerate(counts) if c}


def read_bins(sums: dict[str, float], n: int, name: str = "bin", per: float = 1.0) -> np.ndarray:
    """The ``n`` bins written by ``bin_sums`` (``per``: how many times they were sent)."""
    return np.array([round(sums.get(f"{DIST}{name}:{i:02d}", 0.0) / per) for i in range(n)], dtype=np.int64)


def read_value(sums: dict[str, float], name: str, per: float = 1.0) -> float | None:
    value = sums.get(f"{DIST}{name}")
    return None if value is None else value / per


def coarsen(edges: np.ndarray, counts: np.ndarray, target: int = DISPLAY_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs of adjacent bins so that at most ``target`` remain; the
    edges kept are edges of the input, so every count stays exact."""
    counts = np.asarray(counts, dtype=np.int64)
    group = max(1, -(-len(counts) // target))
    starts = np.arange(0, len(counts), group)
    return np.append(np.asarray(edges)[starts], edges[-1]), np.add.reduceat(counts, starts) if len(counts) else counts


def fixed_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins`` equal bins over [lo, hi]; i / bins is rounded once, so over
    [0, 1] a threshold such as 0.3 is an edge exactly."""
    return lo + (hi - lo) * (np.arange(bins + 1) / bins)


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value: ``edges[i] <= v < edges[i + 1]``, the last bin
    closed; values outside the edges go to the first or last bin."""
    idx = np.searchsorted(edges, values, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


def bin_holding(edges: Sequence[float], value: float) -> int | None:
    """The bin whose [lo, hi) holds ``value`` (the last bin also holds its
    upper edge), or None when ``value`` is outside the edges."""
    if not math.isfinite(value) or value < edges[0] or value > edges[-1]:
        return None
    return int(bin_index(np.asarray(edges), np.array([value]))[0])


def _bar(count: int, most: int) -> str:
    if not most or not count:
        return ""
    eighths = max(1, round(_BAR_WIDTH * 8 * count / most))
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _num(x: float) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _count(n: int) -> str:
    return f"{int(n):,}"


def share(kept: int, total: int) -> str:
    return f"{_count(kept)} of {_count(total)} rows ({(100.0 * kept / total) if total else 0.0:.2f}%)"


def histogram_report(
    title: str,
    edges: Sequence[float],
    counts: Sequence[int],
    *,
    kept: Sequence[int] | None = None,
    mark: int | None = None,
    lines: Sequence[str] = (),
    label: str = "score",
) -> Report:
    """A histogram as a markdown table (range, rows, kept rows, a bar of
    block characters, "◀ threshold" on the bin ``mark`` that holds the
    threshold) after the summary ``lines``, and as table-artifact rows
    (bin_lo, bin_hi, count, kept, threshold)."""
    counts = [int(c) for c in counts]
    most = max(counts, default=0)
    head = f"| {label} from | to | rows |" + (" kept |" if kept is not None else "") + " |"
    rule = "| ---: | ---: | ---: |" + (" ---: |" if kept is not None else "") + " --- |"
    out = [*lines, "", head, rule] if lines else [head, rule]
    table = []
    for i, c in enumerate(counts):
        lo, hi = float(edges[i]), float(edges[i + 1])
        bar = _bar(c, most) + (" ◀ threshold" if i == mark else "")
        k = None if kept is None else int(kept[i])
        out.append(f"| {_num(lo)} | {_num(hi)} | {_count(c)} |" + ("" if k is None else f" {_count(k)} |") + f" {bar} |")
        row = {"bin_lo": lo, "bin_hi": hi, "count": c}
        if k is not None:
            row["kept"] = k
        row["threshold"] = i == mark
        table.append(row)
    return Report(title=title, markdown="\n".join(out), table=table)
