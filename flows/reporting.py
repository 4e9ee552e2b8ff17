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


def node_artifacts(spec: NodeSpec, row: dict, obs: Observation, task_run_id: UUID, logger) -> None:
    """Row counts and time as a table artifact on the node's task run; a
    reporting node's report as markdown (and table) artifacts and a log line."""
    TableArtifact(
        table=[{k: row[k] for k in ("type", "rows_in", "rows_out", "task_seconds", "batch_fn_seconds", "status")}],
        key=artifact_key(f"rows-{spec.type_name}"),
        description=f"Rows and time of {spec.path}",
        task_run_id=task_run_id,
    ).create()
    logger.info(
        "%s: rows in %s, rows out %s, %.3fs (batch functions %.3fs)",
        spec.path, _fmt(row["rows_in"]), _fmt(row["rows_out"]), row["task_seconds"], row["batch_fn_seconds"],
    )
    report = spec.build().report(obs)
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
