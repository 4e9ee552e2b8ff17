"""The Prefect flow built from a Kaiyuan YAML tree.

Every node of the tree is one Prefect task run, submitted to prefect-ray's
task runner with zero CPUs (a task that drives Ray Data is itself a driver;
holding a CPU for it hangs a 2-core machine). Node tasks build lazy Ray
Data plans and hand them upward, so consecutive row-wise nodes fuse and
stream; the root's task executes the plan exactly once. Row counts, time and
observations are reported by the nodes' batch functions into a per-run
``RunStats`` actor and published after the root finishes, as artifacts of
each node's task run plus a run-summary artifact for the flow.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from flows.config import NodeSpec, PipelineConfig, load_config
from flows.runtime import configure_ray_data, init_ray, resolve_ray_address
from tasks.base import NodeError, Observation, RunContext, Stream


class DeferredRayTaskRunner(RayTaskRunner):
    """prefect-ray's task runner, except that Ray is started by the flow body
    (the address comes from the YAML and the CLI, which the task runner
    cannot see when the flow run starts)."""

    def __enter__(self):
        TaskRunner.__enter__(self)
        self._owns_ray = False
        return self

    def duplicate(self):
        return type(self)(address=self.address, init_kwargs=self.init_kwargs)


@dataclasses.dataclass
class NodeOutput:
    stream: Stream | None
    seconds: float
    skipped_children: bool = False


@dataclasses.dataclass
class RootResult:
    num_rows: int
    preview: pa.Table
    output_path: str | None
    seconds: float


def finalize(node, stream: Stream, preview_rows: int) -> tuple[int, pa.Table]:
    """Compute the root's result once: a written dataset is counted from its
    metadata; anything else is streamed once (count + first rows), never
    collected on the driver."""
    if stream.num_rows is not None:
        preview = stream.ds.take_batch(preview_rows, batch_format="pyarrow") if preview_rows and stream.num_rows else stream.schema.empty_table()
        return stream.num_rows, preview
    count, head = 0, []
    kept = 0
    for batch in stream.ds.iter_batches(batch_format="pyarrow", batch_size=None):
        count += batch.num_rows
        if kept < preview_rows and batch.num_rows:
            part = batch.slice(0, preview_rows - kept)
            head.append(part)
            kept += part.num_rows
    preview = pa.concat_tables(head, promote_options="permissive") if head else stream.schema.empty_table()
    return count, preview


@task(cache_policy=NO_CACHE, persist_result=False)
def run_node(
    spec: NodeSpec,
    inputs: list[NodeOutput],
    ctx: RunContext,
    is_root: bool = False,
    preset: Stream | None = None,
    preview_rows: int = 20,
    target_block_size_mb: int | None = None,
):
    """One YAML node: build its Ray Data plan (and, for the root, execute it)."""
    configure_ray_data(target_block_size_mb)
    start = time.perf_counter()
    node = spec.build()
    stream = preset if preset is not None else node.apply([i.stream for i in inputs], ctx)
    if is_root:
        num_rows, preview = finalize(node, stream, preview_rows)
        out_path = node.uri() if hasattr(node, "uri") else None
        return RootResult(num_rows, preview, out_path, time.perf_counter() - start)
    return NodeOutput(stream, time.perf_counter() - start, preset is not None)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        app = load_config(params["config"]).ray.app_name
    except Exception:
        app = "kaiyuan"
    return f"{app}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_context(cfg: PipelineConfig, seed: int | None, stats_actor: str | None, namespace: str | None) -> RunContext:
    from tasks.storage import resolve_storage_options

    data = cfg.ray.data
    return RunContext(
        seed=cfg.ray.seed if seed is None else seed,
        batch_size=data.batch_size,
        target_block_size_mb=data.target_block_size_mb,
        concurrency=data.concurrency,
        max_write_blocks=data.max_write_blocks,
        storage_options=resolve_storage_options(None, cfg.ray.storage_options),
        stats_actor=stats_actor,
        ray_namespace=namespace,
    )


def check_nodes(cfg: PipelineConfig, ctx: RunContext) -> None:
    """Pre-flight checks on metadata only (paths exist, create targets free)."""
    from flows.config import ConfigError

    problems = []
    for spec in cfg.nodes():
        try:
            spec.build().check(ctx)
        except NodeError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems, cfg.source)


def execute(cfg: PipelineConfig, ctx: RunContext, preview_rows: int):
    """Submit one task per node, bottom-up; return (root result, futures by path,
    paths whose computation was skipped)."""
    futures: dict[str, Any] = {}
    skipped: list[str] = []
    block_mb = cfg.ray.data.target_block_size_mb

    def submit(spec: NodeSpec, is_root: bool):
        node = spec.build()
        preset = node.short_circuit(ctx)
        if preset is not None:
            skipped.extend(c.path for child in spec.children for c in child.walk())
            inputs = []
        else:
            inputs = [submit(child, False) for child in spec.children]
        named = run_node.with_options(name=spec.type_name, task_run_name=spec.path)
        with remote_options(num_cpus=0):
            fut = named.submit(spec, inputs, ctx, is_root, preset, preview_rows, block_mb)
        futures[spec.path] = fut
        return fut

    root_future = submit(cfg.root, True)
    return root_future.result(), futures, skipped


def publish(cfg: PipelineConfig, futures: dict[str, Any], observations: dict[str, Observation], skipped: list[str], root: RootResult, logger) -> dict:
    """Per-node artifacts on each node's task run, and the flow's run summary."""
    from flows.reporting import node_artifacts, summary_markdown

    rows: list[dict[str, Any]] = []
    for spec in cfg.nodes():
        fut = futures.get(spec.path)
        obs = observations.get(spec.path, Observation())
        if obs.rows_in is None and spec.children and all(c.path in observations for c in spec.children):
            obs.rows_in = sum(observations[c.path].rows_out or 0 for c in spec.children)
        if spec is cfg.root:
            obs.rows_out = root.num_rows
            seconds = root.seconds
        else:
            seconds = fut.result().seconds if fut is not None else 0.0
        row = {
            "node": spec.path,
            "type": spec.type_name,
            "rows_in": obs.rows_in,
            "rows_out": obs.rows_out,
            "task_seconds": round(seconds, 3),
            "batch_fn_seconds": round(obs.seconds, 3),
            "status": "skipped (target exists)" if spec.path in skipped else "ran",
        }
        rows.append(row)
        if fut is not None:
            node_artifacts(spec, row, obs, fut.task_run_id, logger)
    return {"nodes": rows, "markdown": summary_markdown(cfg, rows)}


@flow(
    name="kaiyuan-pipeline",
    flow_run_name=_flow_run_name,
    task_runner=DeferredRayTaskRunner(),
    persist_result=False,
    log_prints=True,
)
def kaiyuan_pipeline(
    config: str,
    mode: str = "local",
    ray_address: str | None = None,
    seed: int | None = None,
    preview_rows: int = 20,
) -> dict:
    """Run a Kaiyuan YAML pipeline. Returns the row count, the first rows and
    per-node statistics of the result."""
    import ray

    from flows.reporting import publish_summary
    from tasks.stats import RunStats

    logger = get_run_logger()
    cfg = load_config(config)
    if mode == "k8s":  # SPEC §2: data/{sample,output,models}/ -> s3://BUCKET/...
        from flows.k8s_paths import rewrite_config

        cfg = rewrite_config(cfg)
    address = resolve_ray_address(mode, ray_address, cfg.ray.address)
    started = init_ray(
        address,
        init_kwargs=cfg.ray.init_kwargs,
        runtime_env=cfg.ray.runtime_env,
        namespace=cfg.ray.namespace,
    )
    configure_ray_data(cfg.ray.data.target_block_size_mb, cfg.ray.debug_stats)
    namespace = ray.get_runtime_context().namespace
    stats_name = f"kaiyuan-stats-{uuid.uuid4().hex[:12]}"
    stats = RunStats.options(name=stats_name, namespace=namespace).remote()
    try:
        ctx = run_context(cfg, seed, stats_name, namespace)
        check_nodes(cfg, ctx)
        root, futures, skipped = execute(cfg, ctx, preview_rows)
        observations = ray.get(stats.snapshot.remote())
        summary = publish(cfg, futures, observations, skipped, root, logger)
        publish_summary(summary["markdown"], logger)
    finally:
        ray.kill(stats)
        if started and ray.get_runtime_context().worker.mode == 0:
            ray.shutdown()
    return {
        "num_rows": root.num_rows,
        "output_path": root.output_path,
        "preview": root.preview.to_pylist(),
        "preview_columns": root.preview.column_names,
        "nodes": summary["nodes"],
    }
