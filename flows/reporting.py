"""Prefect artifacts and log lines for node statistics and node reports."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

from prefect.artifacts import MarkdownArtifact, TableArtifact

from flows.config import NodeSpec, PipelineConfig
from tasks.base import Observation


def artifact_key(text: str) -> str:
    """Prefect keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")[:120]


def _fmt(value: Any) -> str:
    return "–" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))


def node_artifacts(spec: NodeSpec, row: dict, obs: Observation, parameters: dict[str, Any], task_run_id: UUID, logger) -> None:
    """One markdown artifact on the node's task run: rows in/out, time and
    status, then its parameters (defaults included, secrets redacted). A
    reporting node's report comes as markdown (and table) artifacts and a
    log line as well."""
    MarkdownArtifact(
        markdown=node_markdown(spec, row, parameters),
        key=artifact_key(f"node-{spec.type_name}"),
        description=f"Rows, time and parameters of {spec.path}",
        task_run_id=task_run_id,
    ).create()
    logger.info(
        "%s: rows in %s, rows out %s, %.3fs (batch functions %.3fs), %s",
        spec.path, _fmt(row["rows_in"]), _fmt(row["rows_out"]), row["task_seconds"], row["batch_fn_seconds"], row["status"],
    )
    report = spec.build().report(obs) if row["rows_out"] is not None else None  # none for a failed run
    if report is None:
        return
    if report.markdown:
        MarkdownArtifact(
            markdown=f"### {report.title} — {spec.path}\n\n{report.markdown}",
            key=artifact_key(f"report-{spec.type_name}"),
            description=f"{report.title} of {spec.path}",
            task_run_id=task_run_id,
        ).create()
        logger.info("%s %s:\n%s", spec.path, report.title, report.markdown)
    if report.table:
        TableArtifact(
            table=report.table,
            key=artifact_key(f"rows-preview-{spec.type_name}"),
            description=f"{report.title} of {spec.path}",
            task_run_id=task_run_id,
        ).create()


def node_markdown(spec: NodeSpec, row: dict, parameters: dict[str, Any]) -> str:
    """A node's rows, time, status and parameters as markdown tables."""
    lines = [
        f"### {spec.type_name} — `{spec.path}`",
        "",
        "| rows in | rows out | task seconds | batch function seconds | status |",
        "| ---: | ---: | ---: | ---: | --- |",
        f"| {_fmt(row['rows_in'])} | {_fmt(row['rows_out'])} | {row['task_seconds']:.3f} | {row['batch_fn_seconds']:.3f} | {row['status']} |",
        "",
        "**Parameters** (defaults included, secrets redacted)",
        "",
        "| parameter | value |",
        "| --- | --- |",
    ]
    for name, value in parameters.items():
        lines.append(f"| {_cell(name)} | {_cell(value if isinstance(value, str) else repr(value))} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def summary_markdown(cfg: PipelineConfig, rows: list[dict]) -> str:
    """The tree with row counts per node."""
    by_path = {r["node"]: r for r in rows}
    lines = [
        f"## Run summary: {cfg.ray.app_name}",
        "",
        f"Config: `{cfg.source}`",
        "",
        "```",
    ]

    def visit(spec: NodeSpec, depth: int) -> None:
        r = by_path[spec.path]
        counts = f"rows in {_fmt(r['rows_in'])} → out {_fmt(r['rows_out'])}"
        extra = "" if r["status"] == "ran" else f"  [{r['status']}]"
        lines.append(f"{'  ' * depth}{spec.type_name}: {counts}, {r['task_seconds']:.2f}s{extra}")
        for child in spec.children:
            visit(child, depth + 1)

    visit(cfg.root, 0)
    lines.append("```")
    return "\n".join(lines)


def publish_summary(markdown: str, logger) -> None:
    MarkdownArtifact(markdown=markdown, key="run-summary", description="Pipeline tree with row counts per node").create()
    logger.info("\n%s", markdown)
