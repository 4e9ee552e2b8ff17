"""The tree onto Prefect tasks: one task run per YAML node.

Node tasks are submitted children first, each to prefect-ray's task runner
with zero CPUs (a task that drives Ray Data is a driver itself; holding a CPU
for it hangs a 2-core machine). Each builds its node's lazy Ray Data plan
from its children's plans and hands it upward, so row-wise nodes fuse and
stream; the root's task executes the plan once. A node whose output can be
taken from a finished dataset (``read_if_exists``, a reused checkpoint) is
submitted without its children.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options

from flows.config import NodeSpec
from flows.errors import retry_transient
from flows.plan import CheckpointPlan, RunPlan, node_storage
from tasks.base import RunContext, Stream
from tasks.combine import apply_to_children


@dataclasses.dataclass
class NodeOutput:
    """What a node task below the root hands to its parent."""

    stream: Stream | None
    seconds: float
    skipped_children: bool = False
    status: str = "ran"
    rows: int | None = None


@dataclasses.dataclass
class RootResult:
    """What the root's task returns to the flow."""

    num_rows: int
    preview: pa.Table
    output_path: str | None
    seconds: float
    status: str = "ran"


@dataclasses.dataclass
class Submitted:
    """The node tasks of a run as submitted: futures by node path, and the
    nodes whose computation was skipped (path -> why)."""

    futures: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


@task(cache_policy=NO_CACHE, persist_result=False)
def run_node(
    spec: NodeSpec,
    inputs: list[NodeOutput],
    ctx: RunContext,
    is_root: bool = False,
    preset: Stream | None = None,
    preview_rows: int = 20,
    checkpoint: CheckpointPlan | None = None,
):
    """One YAML node: build its Ray Data plan (and, for the root, execute it)."""
    from flows.checkpoint import inject_fault
    from flows.config import install_block_resolver
    from flows.errors import quiet_user_errors
    from flows.runtime import configure_ray_data

    configure_ray_data(ctx.target_block_size_mb, ctx.debug_stats, ctx.read_parallelism, ctx.shuffle_strategy)
    quiet_user_errors()
    install_block_resolver()
    inject_fault(spec)
    start = time.perf_counter()
    node = spec.build()
    if checkpoint is not None and checkpoint.marker is not None:
        stream = checkpoint.store.read(checkpoint.marker, node_storage(spec, ctx))
        status, rows = "checkpoint reused", checkpoint.marker["rows"]
    else:
        stream = preset if preset is not None else apply_to_children(node, [i.stream for i in inputs], ctx)
        status, rows = "ran", None
        if checkpoint is not None and preset is None:
            stream, rows = _save_checkpoint(spec, ctx, checkpoint, stream, start)
            status = "ran (checkpoint saved)"
    if is_root:
        num_rows, preview = finalize(stream, preview_rows)
        return RootResult(num_rows, preview, node.output_uri(), time.perf_counter() - start, status)
    seconds = time.perf_counter() - start
    _record_node_task(ctx, spec.path, seconds, status, rows)
    return NodeOutput(stream, seconds, preset is not None or status == "checkpoint reused", status, rows)


def _save_checkpoint(spec: NodeSpec, ctx: RunContext, checkpoint: CheckpointPlan, stream: Stream, start: float):
    """Persist a node's output (or record the dataset a writer committed);
    returns the stream the parent reads and its row count."""
    store = checkpoint.store
    if checkpoint.kind == "data":
        uri, version, rows = store.write(spec, checkpoint.key, stream)
        stream = store.read({"uri": uri, "version": version, "rows": rows, "kind": "data"})
    else:
        import lance

        uri = spec.build().output_uri()
        version = lance.dataset(uri, storage_options=node_storage(spec, ctx) or None).version
        rows = stream.num_rows
    store.save(spec, checkpoint.key, uri, version, rows, checkpoint.kind, time.perf_counter() - start)
    return stream, rows


def _record_node_task(ctx: RunContext, path: str, seconds: float, status: str, rows: int | None) -> None:
    """Synchronous, so the record is there when the flow reads it after the
    root (the flow never fetches a node task's result: it holds a dataset)."""
    from tasks.metrics import stats_client

    client = stats_client(ctx)
    if client is not None:
        client.node_task(path, seconds, status, rows)


def finalize(stream: Stream, preview_rows: int) -> tuple[int, pa.Table]:
    """The root's row count and first rows: a written dataset is counted from
    its metadata; anything else is streamed once, never collected on the driver."""
    if stream.num_rows is not None:
        preview = stream.ds.take_batch(preview_rows, batch_format="pyarrow") if preview_rows and stream.num_rows else stream.schema.empty_table()
        return stream.num_rows, preview
    count, head, kept = 0, [], 0
    for batch in stream.ds.iter_batches(batch_format="pyarrow", batch_size=None):
        count += batch.num_rows
        if kept < preview_rows and batch.num_rows:
            part = batch.slice(0, preview_rows - kept)
            head.append(part)
            kept += part.num_rows
    preview = pa.concat_tables(head, promote_options="permissive") if head else stream.schema.empty_table()
    return count, preview


def submission_order(plan: RunPlan, skipped: dict[str, str]) -> list[tuple[NodeSpec, Stream | None, bool]]:
    """Post-order (children first): each node to submit, the finished output
    it uses instead of its children (or None) and whether its children run.
    Fills ``skipped`` with the nodes below a short cut."""
    from flows.runtime import configure_ray_data

    ctx = plan.ctx

    def visit(spec: NodeSpec) -> list[tuple[NodeSpec, Stream | None, bool]]:
        checkpoint = plan.checkpoints.get(spec.path)
        reused = checkpoint is not None and checkpoint.marker is not None
        preset = None if reused else spec.build().short_circuit(ctx)
        if preset is not None:
            # Built on the driver, whose Ray Data settings are not the run's.
            configure_ray_data(ctx.target_block_size_mb, ctx.debug_stats, ctx.read_parallelism, ctx.shuffle_strategy,
                               data_context=preset.ds.context)
        if preset is None and not reused:
            return [item for child in spec.children for item in visit(child)] + [(spec, None, True)]
        why = "skipped (target exists)" if preset is not None else "skipped (checkpoint reused above)"
        skipped.update((c.path, why) for child in spec.children for c in child.walk())
        return [(spec, preset, False)]

    return visit(plan.root)


def submit_tree(plan: RunPlan, submitted: Submitted) -> Any:
    """Submit one task per node, children first; return the root's future.

    Node tasks take no CPU, so Ray would start a worker process (each
    importing Prefect) for every node task that can run at once; most build a
    lazy plan in milliseconds, so a window of a few keeps up. In post-order
    the oldest task in flight always has its inputs done: no deadlock."""
    import ray

    from flows.runtime import wait_for_prewarm

    prefect = plan.cfg.prefect
    retry = {"retries": prefect.retries, "retry_delay_seconds": prefect.retry_delay_seconds, "retry_condition_fn": retry_transient}
    window, in_flight = node_task_window(), []
    # Node tasks (zero CPUs: they build plans and drive Ray Data) stay on
    # the driver's node, which the run needs anyway: a worker node lost
    # mid-run then costs only the Ray Data tasks on it, which Ray retries.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    order = submission_order(plan, submitted.skipped)
    wait_for_prewarm()
    for spec, preset, with_children in order:
        if len(in_flight) >= window:
            _, in_flight = ray.wait(in_flight, num_returns=1, fetch_local=False)
        inputs = [submitted.futures[child.path] for child in spec.children] if with_children else []
        named = run_node.with_options(name=spec.type_name, task_run_name=spec.path, **retry)
        with remote_options(num_cpus=0, scheduling_strategy=here):
            future = named.submit(spec, inputs, plan.ctx, spec is plan.root, preset, plan.preview_rows, plan.checkpoints.get(spec.path))
        submitted.futures[spec.path] = future
        in_flight.append(future.wrapped_future)
    return submitted.futures[plan.root.path]


def root_result(submitted: Submitted, root_future) -> RootResult:
    """Wait for the root. A failed node leaves the nodes above it unrun: raise
    the error of the first failed node (post-order), which names it."""
    try:
        return root_future.result()
    except Exception:
        for future in submitted.futures.values():
            future.wait()
            if future.state.is_failed():
                future.result()
        raise


def cancel_node_tasks(submitted: Submitted) -> None:
    """Stop the run's node tasks still running (their worker processes are
    killed, and with them the Ray Data tasks they own)."""
    import ray

    for future in submitted.futures.values():
        try:
            ray.cancel(future.wrapped_future, force=True)
        except Exception:  # noqa: BLE001 - finished, or its worker already gone
            pass


def node_task_window() -> int:
    """How many node tasks run at once: this machine's cores, at least 2
    (a sibling that materializes must not hold up the others), at most 8."""
    return max(2, min(os.cpu_count() or 1, 8))
