"""What a run tells Prefect: per-node artifacts (rows, time, parameters,
reports), the run summary, the flow run's tags and a progress artifact.
All of it after or beside the work: nothing here holds up a node task."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import MarkdownArtifact, TableArtifact

from flows.build import RootResult, Submitted
from flows.config import NodeSpec, PipelineConfig
from flows.plan import RunPlan
from tasks.base import Observation


def artifact_key(text: str) -> str:
    """Prefect keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")[:120]


def node_key(kind: str, spec: NodeSpec) -> str:
    """A node's artifact key, unique in the run: the kind, the node's position
    (child indices from the root: ``node-0-1-filter`` is the root's first
    child's second child) and its type; the root has no position."""
    position = "-".join(re.findall(r"child_configs\[(\d+)\]", spec.path))
    key = artifact_key("-".join(part for part in (kind, position, spec.type_name) if part))
    if len(key) >= 120:  # deeper than a key holds: a digest of the path stands for the position
        import hashlib

        key = artifact_key(f"{kind}-{hashlib.sha1(spec.path.encode()).hexdigest()[:12]}-{spec.type_name}")
    return key


def _fmt(value: Any) -> str:
    return "–" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))


def node_artifacts(spec: NodeSpec, row: dict, obs: Observation, parameters: dict[str, Any], task_run_id: UUID, logger) -> None:
    """One markdown artifact on the node's task run: rows in/out, time and
    status, then its parameters (defaults included, secrets redacted). A
    reporting node's report comes as markdown (and table) artifacts and a
    log line as well."""
    MarkdownArtifact(
        markdown=node_markdown(spec, row, parameters),
        key=node_key("node", spec),
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
            key=node_key("report", spec),
            description=f"{report.title} of {spec.path}",
            task_run_id=task_run_id,
        ).create()
        logger.info("%s %s:\n%s", spec.path, report.title, report.markdown)
    if report.table:
        TableArtifact(
            table=report.table,
            key=node_key("rows-preview", spec),
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
    from flows.lineage import artifact_lines

    lines += artifact_lines(spec, row["status"])
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


# -- the run's node table ----------------------------------------------------


def node_rows(plan: RunPlan, submitted: Submitted, observations: dict[str, Observation],
              node_tasks: dict[str, tuple], root: RootResult | None) -> list[dict[str, Any]]:
    """One row per node: rows in/out, time, status (and the node's
    ``observation``, which the caller pops). ``node_tasks``: path ->
    (seconds, status, rows) as each node task recorded it. ``root`` is None
    when the run failed: a node's status is then its task's outcome, and no
    rows are reported (partial counts would read as results)."""
    rows = []
    for spec in plan.nodes():
        obs = observations.get(spec.path) or Observation()
        if obs.rows_in is None and spec.children and all(c.path in observations for c in spec.children):
            obs.rows_in = sum(observations[c.path].rows_out or 0 for c in spec.children)
        if root is None:
            seconds, status = node_tasks.get(spec.path, (0.0,))[0], _outcome(submitted.futures.get(spec.path))
        elif spec is plan.root:
            obs.rows_out = root.num_rows
            seconds, status = root.seconds, root.status
        else:
            seconds, status, known_rows = node_tasks.get(spec.path, (0.0, "ran", None))
            if obs.rows_out is None and known_rows is not None:
                obs.rows_out = known_rows
        rows.append({
            "node": spec.path,
            "type": spec.type_name,
            "rows_in": obs.rows_in,
            "rows_out": obs.rows_out,
            "task_seconds": round(seconds, 3),
            "batch_fn_seconds": round(obs.seconds, 3),
            "status": submitted.skipped.get(spec.path, status),
            "observation": obs,
        })
    return rows


def _outcome(future) -> str:
    """A node task's outcome in a failed run."""
    if future is None:
        return "not run"
    state = future.state
    return "ran" if state.is_completed() else "failed" if state.is_failed() or state.is_crashed() else "not run"


def publish(plan: RunPlan, submitted: Submitted, observations: dict[str, Observation],
            node_tasks: dict[str, tuple], root: RootResult | None, logger) -> dict:
    """One artifact per node on its task run and the flow's run summary,
    sent concurrently (independent API calls) at the end."""
    from flows.checkpoint import node_parameters

    rows = node_rows(plan, submitted, observations, node_tasks, root)
    observed = [row.pop("observation") for row in rows]
    jobs = []
    for spec, row, obs in zip(plan.nodes(), rows, observed):
        future = submitted.futures.get(spec.path)
        if future is None:
            continue
        params = node_parameters(spec)
        checkpoint = plan.checkpoints.get(spec.path)
        if checkpoint is not None:
            params["(checkpoint key)"] = checkpoint.key
        jobs.append((node_artifacts, spec, row, obs, params, future.task_run_id, logger))
    markdown = summary_markdown(plan.cfg, rows)
    with Background() as background:
        for job in [*jobs, (publish_summary, markdown, logger)]:
            background.submit(*job)
    return {"nodes": rows, "markdown": markdown}


def publish_failed(plan: RunPlan, submitted: Submitted, logger) -> None:
    """A failed run's node artifacts (each node's outcome and parameters) and
    its summary tree; never masks the run's own error."""
    try:
        publish(plan, submitted, {}, {}, None, logger)
    except Exception as exc:
        logger.warning("could not publish the failed run's artifacts: %s", exc)


class Background:
    """Prefect API calls that nothing waits for run in threads, each in a copy
    of the flow run's context (so artifacts attach to it); leaving the block
    waits for them. With a logger, a failed call is logged and never fails
    the run; without one, its error is raised."""

    def __init__(self, logger=None, on_interrupt: Callable[[], None] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kaiyuan-api")
        self._jobs: list = []
        self._logger = logger
        self._on_interrupt = on_interrupt  # before waiting, when left by Ctrl-C (the jobs may wait on the run)

    def submit(self, fn, *args) -> None:
        import contextvars

        self._jobs.append((fn, self._pool.submit(contextvars.copy_context().run, fn, *args)))

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and not issubclass(exc[0], Exception) and self._on_interrupt is not None:
            self._on_interrupt()
        try:
            for fn, job in self._jobs:
                error = job.exception()
                if error is not None and self._logger is not None:
                    self._logger.warning("%s failed: %s", getattr(fn, "__name__", fn), error)
                elif error is not None and exc[0] is None:
                    raise error
        finally:
            self._pool.shutdown(wait=True)


# -- tags and progress, while the nodes run -------------------------------------

# How long the bookkeeping waits for the node tasks below the root: lazy
# nodes finish within a fraction of a second of the run's start.
CHAIN_GRACE_S = 2.0

# Progress is polled (one call to the run's stats actor) and sent at most
# this often: each artifact update is an API write.
PROGRESS_INTERVAL_S = 2.0

# Called with (rows read, rows expected) as the run progresses and once at
# its end (rows read == expected); the CLI draws its progress bar from it.
PROGRESS_LISTENERS: list[Callable[[int, int], None]] = []


def bookkeeping(plan: RunPlan, submitted: Submitted, root_future, rows_out: Callable[[], dict[str, int]]) -> None:
    """The flow run's tags (when it was not created with them), then the
    run's progress. The tags first wait (up to ``CHAIN_GRACE_S``) for the
    node tasks below the root, so they do not compete with the chain of
    node-task starts the root waits for. Waiting on Ray object refs fetches
    nothing onto the driver."""
    import ray

    refs = [future.wrapped_future for future in submitted.futures.values()]
    below_root = [ref for ref in refs if ref != root_future.wrapped_future]
    if below_root:
        ray.wait(below_root, num_returns=len(below_root), timeout=CHAIN_GRACE_S, fetch_local=False)
    tag_flow_run(plan.cfg)
    Progress(plan, submitted.skipped, rows_out).follow(root_future.wrapped_future)


class Progress:
    """Rows read at the leaves against the readers' row counts from metadata
    (``flows.plan.expected_rows``), from the statistics the run collects anyway.
    Shown to ``PROGRESS_LISTENERS`` and, once the run has lasted
    ``prefect.progress_after_s``, as the run's progress artifact (a shorter
    run gets none: each write costs the API CPU taken from the run)."""

    def __init__(self, plan: RunPlan, skipped: dict[str, str], rows_out: Callable[[], dict[str, int]]):
        # Readers below a reused checkpoint or an existing target read nothing.
        from flows.plan import expected_rows

        self.expected = {path: n for path, n in expected_rows(plan.cfg, plan.ctx).items() if path not in skipped}
        self.total = sum(self.expected.values())
        self.rows_out = rows_out
        self.after_s = plan.cfg.prefect.progress_after_s
        self.nodes = len(plan.nodes())
        self.artifact_id = None
        self.sent = None

    def rows_read(self) -> int:
        # A reader read twice (a node that passes over its input again)
        # counts once: progress never runs past its total.
        rows = self.rows_out()
        return sum(min(rows.get(path, 0), n) for path, n in self.expected.items())

    def follow(self, root_ref) -> None:
        """Poll until the root's task ends: a run that succeeds ends at 100%
        (a node may stop reading early), one that fails where it got to."""
        import ray

        start, read, done, succeeded = time.monotonic(), 0, False, False
        while not done:
            ready, _ = ray.wait([root_ref], timeout=PROGRESS_INTERVAL_S, fetch_local=False)
            done = bool(ready)
            succeeded = done and _succeeded(root_ref)
            if succeeded:
                read = self.total
            else:
                try:  # below the total until the root is done
                    read = max(read, min(self.rows_read(), max(self.total - 1, 0)))
                except Exception:  # the run's statistics are gone: it is ending
                    done = True
            for listener in PROGRESS_LISTENERS:
                listener(read, self.total)
            if time.monotonic() - start >= self.after_s or (self.artifact_id is not None and done):
                self._publish(100.0 * read / self.total if self.total else (100.0 if succeeded else 0.0))

    def _publish(self, percent: float) -> None:
        """The progress artifact, created on first use (best effort)."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = round(percent, 1)
        if percent == self.sent:
            return
        try:
            if self.artifact_id is None:
                what = f"{self.total:,} input rows" if self.total else f"{self.nodes} nodes"
                self.artifact_id = create_progress_artifact(percent, key="pipeline-progress", description=f"Rows read ({what})")
            else:
                update_progress_artifact(self.artifact_id, percent)
            self.sent = percent
        except Exception:
            pass


def _succeeded(root_ref) -> bool:
    """Whether the root's task run completed (prefect-ray's task returns its state)."""
    import ray

    try:
        return bool(ray.get(root_ref).is_completed())
    except Exception:
        return False


def flow_run_tags(cfg: PipelineConfig) -> list[str]:
    """The flow run's tags: the config name, the app name and prefect.tags.
    Callers that create the flow run (the CLI, deployments in prefect.yaml)
    give it these at creation; the flow adds any that are missing."""
    tags = ["kaiyuan", f"app:{cfg.ray.app_name}", *cfg.prefect.tags]
    if cfg.source:
        tags.insert(1, f"config:{Path(cfg.source).stem}")
    return tags


def tag_flow_run(cfg: PipelineConfig) -> list[str]:
    """Add the tags of ``flow_run_tags`` that the flow run lacks (one API
    call, none when it was created with them). Never on node task runs
    (see prefect_workarounds: untagged_task_runs)."""
    tags = flow_run_tags(cfg)
    try:
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext

        run = FlowRunContext.get().flow_run  # as created; tags only change through this call
        if set(tags) <= set(run.tags or []):
            return tags
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, tags=list(dict.fromkeys([*(run.tags or []), *tags])))
    except Exception as exc:
        get_run_logger().warning("could not tag the flow run: %s", exc)
    return tags


def flow_run_name() -> str:
    """``<ray.app_name>-<timestamp>``, from the config the run was given."""
    from prefect.runtime import flow_run

    from flows.plan import config_for_run

    params = flow_run.parameters
    try:
        app = config_for_run(params["config"], params.get("overrides"), keep=True).ray.app_name
    except Exception:
        app = "kaiyuan"
    return f"{app}-{time.strftime('%Y%m%d-%H%M%S')}"
