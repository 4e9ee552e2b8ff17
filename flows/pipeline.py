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
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import get_current_settings
from prefect.task_runners import TaskRunner
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext, remote_options
from prefect_ray.task_runners import PrefectRayFuture

from flows.config import NodeSpec, PipelineConfig, check_nodes, load_config
from flows.runtime import configure_ray_data, init_ray, quiet_user_errors, resolve_ray_address
from tasks.base import NodeError, Observation, RunCancelled, RunContext, Stream, find_in_chain

import tasks.storage as _storage
from blocks import storage_options_for as _storage_options_for

# `storage_options: {block: NAME}` resolves through a LanceStorage block, in
# the flow process and in every Ray worker that imports this module.
if _storage.BLOCK_RESOLVER is None:
    _storage.BLOCK_RESOLVER = _storage_options_for


def _dump_settings_once() -> None:
    """Dump the Prefect settings to a dict once per settings object (identity,
    not equality) instead of once per node task (see ``_task_context``)."""
    from prefect.context import SettingsContext

    if getattr(SettingsContext.serialize, "_kaiyuan", False):
        return
    original_dump = SettingsContext.serialize
    dumped: dict = {}

    def dump_once(self, include_secrets: bool = True):
        hit = dumped.get(include_secrets)
        if hit is None or hit[0] is not self:
            hit = dumped[include_secrets] = (self, original_dump(self, include_secrets=include_secrets))
        return hit[1]

    dump_once._kaiyuan = True
    SettingsContext.serialize = dump_once


_dump_settings_once()


def _task_context(task, task_run_id, task_inputs) -> dict:
    """The Prefect context a node task is run in: cheap settings, no tags.

    prefect-ray serializes the whole Prefect context for every task it
    submits, and every worker rebuilds it. For the settings that cost, per
    node task on this machine, 0.2 s to dump them to a dict on the driver and
    0.3 s to validate that dict again in the worker (pydantic-settings
    re-reads the environment for each of ~50 nested models): most of a lazy
    node task's time. The settings of a run never change, so they are dumped
    once (``_dump_settings_once``) and shipped as the object itself, which
    pickles without validation. Ray workers are the same platform as the
    driver, so the path conversion Prefect does for other platforms is not
    needed."""
    from prefect.context import FlowRunContext, SettingsContext, serialize_context

    context = serialize_context(
        asset_ctx_kwargs={"task": task, "task_run_id": task_run_id, "task_inputs": task_inputs, "copy_to_child_ctx": True}
    )
    current = SettingsContext.get()
    if current is not None and context.get("settings_context"):
        context = {**context, "settings_context": {**context["settings_context"], "settings": current.settings}}
    # The flow run's result store goes as the object too. As a dict it names
    # its storage block by slug, and rebuilding a block from a slug makes
    # Prefect import every installed collection to find the class: 1.2 s
    # (prefect-kubernetes and its Kubernetes client) on the first node task
    # in each Ray worker process.
    flow_run = FlowRunContext.get()
    if flow_run is not None and flow_run.result_store is not None and "result_store" in context.get("flow_run_context", {}):
        context = {**context, "flow_run_context": {**context["flow_run_context"], "result_store": flow_run.result_store}}
    # No tags: the CLI gives the flow run its tags through ``prefect.tags``,
    # and a task run created under that context would carry them too, which
    # makes Prefect check tag concurrency limits for each node task (see
    # ``_tag_flow_run``). The flow run keeps them.
    return {**context, "tags_context": {}}


class DeferredRayTaskRunner(RayTaskRunner):
    """prefect-ray's task runner, except that Ray is started by the flow body
    (the address comes from the YAML and the CLI, which the task runner
    cannot see when the flow run starts), and that every task with the same
    Ray options goes through one Ray remote function (see ``submit``)."""

    def __enter__(self):
        TaskRunner.__enter__(self)
        self._owns_ray = False
        return self

    def duplicate(self):
        return type(self)(address=self.address, init_kwargs=self.init_kwargs)

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        """What ``RayTaskRunner.submit`` does, through a cached remote function.

        prefect-ray wraps its task entry point in a new ``ray.remote`` on every
        submit, and each gets a new random function ID. So every node task
        exported the function to the GCS (two round trips), asked the raylet
        for a fresh worker lease (a new scheduling key: no lease reuse), made
        its worker fetch and unpickle the function again, and left one more
        entry in the GCS function table for the life of the job."""
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        task_run_id = uuid.uuid4()
        task_inputs = {
            name: collect_task_run_inputs_sync(value, future_cls=PrefectRayFuture)
            for name, value in parameters.items()
        }
        context = _task_context(task, task_run_id, task_inputs)
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        remote = _remote_entry_point(RemoteOptionsContext.get().current_remote_options)
        object_ref = remote.options(name=task.name).remote(
            *upstream_refs,
            task=task,
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=wait_for,
            dependencies=dependencies,
            context=context,
        )
        return PrefectRayFuture(task_run_id=task_run_id, wrapped_future=object_ref)


_REMOTE_ENTRY_POINTS: dict[str, Any] = {}


def _remote_entry_point(options: dict[str, Any]):
    """One ``ray.remote`` wrapper of prefect-ray's task entry point per set of
    Ray options, for the life of the process (Ray re-exports it to a new
    cluster or job by itself)."""
    import json

    import ray

    key = json.dumps(options or {}, sort_keys=True, default=repr)
    remote = _REMOTE_ENTRY_POINTS.get(key)
    if remote is None:
        entry = RayTaskRunner._run_prefect_task
        remote = _REMOTE_ENTRY_POINTS[key] = ray.remote(**options)(entry) if options else ray.remote(entry)
    return remote


@dataclasses.dataclass
class NodeOutput:
    stream: Stream | None
    seconds: float
    skipped_children: bool = False
    status: str = "ran"
    rows: int | None = None


@dataclasses.dataclass
class CheckpointPlan:
    """What run_node does about checkpoints for one node (see flows/checkpoint.py)."""

    store: Any  # CheckpointStore
    key: str
    kind: str  # "data" (write the output to the store) or "writer" (record the written dataset)
    marker: dict | None = None  # set when an existing checkpoint is reused


@dataclasses.dataclass
class RootResult:
    num_rows: int
    preview: pa.Table
    output_path: str | None
    seconds: float
    status: str = "ran"


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
    checkpoint: CheckpointPlan | None = None,
):
    """One YAML node: build its Ray Data plan (and, for the root, execute it)."""
    from flows.checkpoint import inject_fault

    configure_ray_data(ctx.target_block_size_mb, ctx.debug_stats, ctx.read_parallelism, ctx.shuffle_strategy)
    quiet_user_errors()
    inject_fault(spec)
    start = time.perf_counter()
    node = spec.build()
    status = "ran"
    rows = None
    if checkpoint is not None and checkpoint.marker is not None:
        stream = checkpoint.store.read(checkpoint.marker, _node_storage(node, ctx))
        status, rows = "checkpoint reused", checkpoint.marker["rows"]
    else:
        stream = preset if preset is not None else node.apply_to_children([i.stream for i in inputs], ctx)
        if checkpoint is not None and preset is None:
            if checkpoint.kind == "data":
                uri, version, rows = checkpoint.store.write(spec, checkpoint.key, stream)
                marker = {"uri": uri, "version": version, "rows": rows, "kind": "data"}
                stream = checkpoint.store.read(marker)
            else:
                import lance

                uri = node.uri()
                version = lance.dataset(uri, storage_options=_node_storage(node, ctx) or None).version
                rows = stream.num_rows
            checkpoint.store.save(spec, checkpoint.key, uri, version, rows, checkpoint.kind, time.perf_counter() - start)
            status = "ran (checkpoint saved)"
    if is_root:
        num_rows, preview = finalize(node, stream, preview_rows)
        out_path = node.uri() if hasattr(node, "uri") else None
        return RootResult(num_rows, preview, out_path, time.perf_counter() - start, status)
    seconds = time.perf_counter() - start
    if ctx.stats_actor is not None:
        import ray

        from tasks.base import _stats_handle

        # Synchronous, so the record is there when the flow reads it after the root.
        ray.get(_stats_handle(ctx.stats_actor, ctx.ray_namespace).node_task.remote(spec.path, seconds, status, rows))
    return NodeOutput(stream, seconds, preset is not None or status == "checkpoint reused", status, rows)


def _node_storage(node, ctx: RunContext) -> dict:
    return dict(node._storage(ctx)) if hasattr(node, "_storage") else dict(ctx.storage_options)


def _concurrently(jobs: list[tuple]) -> None:
    """Run ``(fn, *args)`` jobs (Prefect API calls) concurrently, each in a
    copy of this context so artifacts attach to this flow run."""
    with Background() as background:
        for job in jobs:
            background.submit(*job)


class Background:
    """Prefect API calls that nothing waits for (tags, the progress artifact)
    run in threads while the nodes run, each in a copy
    of the flow run's context; leaving the block waits for them. With a
    logger, a failed call is logged and never fails the run; without one,
    its error is raised."""

    def __init__(self, logger=None):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kaiyuan-api")
        self._jobs: list = []
        self._logger = logger

    def submit(self, fn, *args) -> None:
        import contextvars

        self._jobs.append((fn, self._pool.submit(contextvars.copy_context().run, fn, *args)))

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for fn, job in self._jobs:
                error = job.exception()
                if error is not None and self._logger is not None:
                    self._logger.warning("%s failed: %s", getattr(fn, "__name__", fn), error)
                elif error is not None and exc[0] is None:
                    raise error
        finally:
            self._pool.shutdown(wait=True)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        app = load_config(params["config"], params.get("overrides")).ray.app_name
    except Exception:
        app = "kaiyuan"
    return f"{app}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_context(cfg: PipelineConfig, seed: int | None, stats_actor: str | None, namespace: str | None) -> RunContext:
    from tasks.storage import resolve_storage_options

    from flows.runtime import default_read_parallelism

    data = cfg.ray.data
    return RunContext(
        seed=cfg.ray.seed if seed is None else seed,
        batch_size=data.batch_size,
        target_block_size_mb=data.target_block_size_mb,
        # Resolved here, once: each node task would otherwise ask the GCS for
        # the cluster's CPUs (one round trip on the path to the root's start).
        read_parallelism=data.read_parallelism or default_read_parallelism(),
        shuffle_strategy=data.shuffle_strategy,
        debug_stats=cfg.ray.debug_stats,
        concurrency=data.concurrency,
        storage_options=resolve_storage_options(None, cfg.ray.storage_options),
        stats_actor=stats_actor,
        ray_namespace=namespace,
    )


def checkpoint_plans(cfg: PipelineConfig, ctx: RunContext, logger) -> dict[str, CheckpointPlan]:
    """Checkpoint plans for the nodes that materialise (only with prefect.checkpoint_dir)."""
    from flows.checkpoint import CheckpointStore, is_plain_writer, materialises, node_keys

    if not cfg.prefect.checkpoint_dir:
        return {}
    store = CheckpointStore(cfg.prefect.checkpoint_dir, dict(ctx.storage_options))
    keys = node_keys(cfg, ctx.seed, dict(ctx.storage_options))
    plans = {}
    for spec in cfg.nodes():
        key = keys.get(spec.path)
        if key is None or not materialises(spec):
            continue
        kind = "writer" if is_plain_writer(spec) else "data"
        marker = store.lookup(spec, key, _node_storage(spec.build(), ctx))
        plans[spec.path] = CheckpointPlan(store, key, kind, marker)
        if marker is not None:
            logger.info("%s: reusing checkpoint %s (key %s, %s rows)", spec.path, marker["uri"], key, marker["rows"])
    return plans


def execute(
    cfg: PipelineConfig,
    ctx: RunContext,
    preview_rows: int,
    plans: dict[str, CheckpointPlan] | None = None,
    background: Background | None = None,
    logger=None,
    futures: dict[str, Any] | None = None,
    skipped: dict[str, str] | None = None,
):
    """Submit one task per node, bottom-up; return the root's result.
    ``futures`` (by node path) and ``skipped`` (path -> why its computation
    was skipped) are filled in as nodes are submitted, so that the caller
    has them when the run fails too. With ``background``, the flow run's
    tags and the progress artifact are sent while the root node runs (also
    when the run fails): see ``_bookkeeping``."""
    import ray

    futures = {} if futures is None else futures
    skipped = {} if skipped is None else skipped
    plans = plans or {}
    retry = {"retries": cfg.prefect.retries, "retry_delay_seconds": cfg.prefect.retry_delay_seconds,
             "retry_condition_fn": retry_transient}

    def to_submit(spec: NodeSpec) -> list[tuple[NodeSpec, Stream | None, bool]]:
        """Post-order (children first): each node to submit, its preset and
        whether its children are computed."""
        plan = plans.get(spec.path)
        reused = plan is not None and plan.marker is not None
        preset = None if reused else spec.build().short_circuit(ctx)
        if preset is not None:
            # Built here, on the driver, whose Ray Data settings are never
            # configured (it runs no Ray Data): give the dataset the run's.
            configure_ray_data(ctx.target_block_size_mb, ctx.debug_stats, ctx.read_parallelism, ctx.shuffle_strategy,
                               data_context=preset.ds.context)
        if preset is not None or reused:
            why = "skipped (target exists)" if preset is not None else "skipped (checkpoint reused above)"
            skipped.update((c.path, why) for child in spec.children for c in child.walk())
            return [(spec, preset, False)]
        return [item for child in spec.children for item in to_submit(child)] + [(spec, None, True)]

    # Node tasks take no CPU, so Ray would start a worker process (each
    # importing Prefect) for every node task that can run at once: a
    # 150-node tree kept 50+ processes on 2 cores. Most node tasks only
    # build a lazy plan in milliseconds, so a few at a time keep up. In
    # post-order the oldest task in flight always has its inputs done, so
    # the window never deadlocks.
    window, in_flight = node_task_window(), []
    for spec, preset, with_children in to_submit(cfg.root):
        if len(in_flight) >= window:
            _, in_flight = ray.wait(in_flight, num_returns=1, fetch_local=False)
        is_root = spec is cfg.root
        inputs = [futures[child.path] for child in spec.children] if with_children else []
        named = run_node.with_options(name=spec.type_name, task_run_name=spec.path, **retry)
        with remote_options(num_cpus=0):
            fut = named.submit(spec, inputs, ctx, is_root, preset, preview_rows, plans.get(spec.path))
        futures[spec.path] = fut
        in_flight.append(fut.wrapped_future)
    root_future = futures[cfg.root.path]
    if background is not None:
        background.submit(_bookkeeping, cfg, dict(futures), root_future)
    try:
        return root_future.result()
    except Exception:
        # A failed node leaves the nodes above it unrun ("PENDING"): raise the
        # error of the first failed node (post-order), which names it.
        for fut in futures.values():
            fut.wait()
            if fut.state.is_failed():
                fut.result()
        raise


def retry_transient(task, task_run, state) -> bool:
    """Retries are for transient failures, never for a user mistake (a
    NodeError names bad data or a bad parameter; it fails the same way again)
    or a cancelled run."""
    from flows.config import ConfigError

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not (isinstance(exc, BaseException) and find_in_chain(exc, (NodeError, ConfigError, RunCancelled)) is not None)


def node_task_window() -> int:
    """How many node tasks run at once: this machine's cores, at least 2
    (a sibling that materializes must not hold up the others), at most 8."""
    import os

    return max(2, min(os.cpu_count() or 1, 8))


def _bookkeeping(cfg: PipelineConfig, futures: dict[str, Any], root_future) -> None:
    """The API calls nothing waits for: the flow run's tags (when it was not
    created with them) and, for runs that last, the progress artifact.

    The tags wait (up to ``CHAIN_GRACE_S``) for the node tasks below the
    root, so that they do not compete with the chain of node-task starts
    that the root's start waits for. Nodes below the root that take long
    (MinHash, sorts) do not hold them back longer than the grace. Waiting on
    the tasks' Ray object refs fetches nothing (Prefect's ``as_completed``
    would fetch each result onto the driver; see RunStats.node_task)."""
    import ray

    refs = [fut.wrapped_future for fut in futures.values()]
    below_root = [ref for ref in refs if ref != root_future.wrapped_future]
    if below_root:
        ray.wait(below_root, num_returns=len(below_root), timeout=CHAIN_GRACE_S, fetch_local=False)
    _tag_flow_run(cfg)
    _track_progress(cfg, refs)


# How long the bookkeeping waits for the node tasks below the root: lazy
# nodes finish within a fraction of a second of the run's start.
CHAIN_GRACE_S = 2.0

# Progress updates are at most this often (the last one always goes out):
# node tasks below the root finish within a fraction of a second of each
# other, and each update is an API write.
PROGRESS_INTERVAL_S = 1.0


def _track_progress(cfg: PipelineConfig, refs: list) -> None:
    """The run's progress artifact (percentage of node tasks finished),
    created once the run has lasted ``prefect.progress_after_s`` and updated
    as node tasks finish. A run over by then gets none: each artifact write
    costs the API 15-20 ms of CPU, which on a small machine is taken from
    the run itself, and a progress bar that appears at 100% tells nothing
    the run's state does not."""
    import ray
    from prefect.artifacts import update_progress_artifact

    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=cfg.prefect.progress_after_s, fetch_local=False)
    if not pending:
        return
    progress_id = _progress_artifact(cfg, 100.0 * len(ready) / len(refs))
    if progress_id is None:
        return
    done, sent = len(ready), len(ready)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=PROGRESS_INTERVAL_S, fetch_local=False)
        done += len(ready)
        if done == sent:
            continue
        try:
            update_progress_artifact(progress_id, round(100.0 * done / len(refs), 1))
            sent = done
        except Exception:
            pass


def publish(
    cfg: PipelineConfig,
    futures: dict[str, Any],
    observations: dict[str, Observation],
    node_tasks: dict[str, tuple],
    skipped: dict[str, str],
    root: RootResult | None,
    plans: dict[str, CheckpointPlan],
    logger,
) -> dict:
    """One artifact per node on its task run (rows in/out, time, status and
    its parameters), and the flow's run summary, sent at once at the end.
    ``node_tasks``: path -> (seconds, status, rows) as each node task
    recorded it. ``root`` is None when the run failed: each node's status
    is then its task's outcome, and no rows are reported (partial counts
    would read as results)."""
    from flows.checkpoint import node_parameters
    from flows.reporting import node_artifacts, publish_summary, summary_markdown

    rows: list[dict[str, Any]] = []
    jobs = []
    for spec in cfg.nodes():
        fut = futures.get(spec.path)
        obs = observations.get(spec.path, Observation())
        if obs.rows_in is None and spec.children and all(c.path in observations for c in spec.children):
            obs.rows_in = sum(observations[c.path].rows_out or 0 for c in spec.children)
        if root is None:
            seconds, status = node_tasks.get(spec.path, (0.0,))[0], _outcome(fut)
        elif spec is cfg.root:
            obs.rows_out = root.num_rows
            seconds, status = root.seconds, root.status
        else:
            seconds, status, known_rows = node_tasks.get(spec.path, (0.0, "ran", None))
            if obs.rows_out is None and known_rows is not None:
                obs.rows_out = known_rows
        if spec.path in skipped:
            status = skipped[spec.path]
        row = {
            "node": spec.path,
            "type": spec.type_name,
            "rows_in": obs.rows_in,
            "rows_out": obs.rows_out,
            "task_seconds": round(seconds, 3),
            "batch_fn_seconds": round(obs.seconds, 3),
            "status": status,
        }
        rows.append(row)
        if fut is not None:
            params = node_parameters(spec)
            plan = plans.get(spec.path)
            if plan is not None:
                params["(checkpoint key)"] = plan.key
            jobs.append((node_artifacts, spec, row, obs, params, fut.task_run_id, logger))
    markdown = summary_markdown(cfg, rows)
    # Artifacts are independent API calls: send them concurrently.
    _concurrently([*jobs, (publish_summary, markdown, logger)])
    return {"nodes": rows, "markdown": markdown}


def _outcome(future) -> str:
    """A node task's outcome in a failed run."""
    if future is None:
        return "not run"
    state = future.state
    return "ran" if state.is_completed() else "failed" if state.is_failed() or state.is_crashed() else "not run"


def flow_run_tags(cfg: PipelineConfig) -> list[str]:
    """The flow run's tags: the config name, the app name and prefect.tags.
    Callers that create the flow run (the CLI, deployments in prefect.yaml)
    give it these at creation; the flow adds any that are missing."""
    tags = ["kaiyuan", f"app:{cfg.ray.app_name}", *cfg.prefect.tags]
    if cfg.source:
        tags.insert(1, f"config:{Path(cfg.source).stem}")
    return tags


def _tag_flow_run(cfg: PipelineConfig) -> list[str]:
    """Add the tags of ``flow_run_tags`` that the flow run lacks (one API
    call, none when it was created with them).

    Not on the node task runs: Prefect checks tag concurrency limits for
    every tagged task run, and the first check in each Ray worker process
    starts a client service (0.9–2.5 s measured here) before the node can
    run. Limits on node tasks would not bound the work anyway: that runs in
    the Ray Data tasks the nodes launch."""
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


def _publish_failed(cfg: PipelineConfig, futures, skipped, plans, logger) -> None:
    """A failed run's node artifacts (each node's outcome and parameters: what
    it was given) and its summary tree; never masks the run's own error."""
    try:
        publish(cfg, futures, {}, {}, skipped, None, plans, logger)
    except Exception as exc:
        logger.warning("could not publish the failed run's artifacts: %s", exc)


class GracefulStop:
    """SIGTERM (what Kubernetes and Prefect workers send) during a run asks the
    run to stop instead of killing it mid-commit: batch functions and the
    writers' commit see the request through the run's stats actor and raise
    RunCancelled, so the run ends CANCELLED with every output unchanged, or,
    when the output was already committed, COMPLETED. Replaces Prefect's own
    handler for the body of the flow (it raised inside ``ray.get`` while the
    commit went ahead in a Ray worker)."""

    def __init__(self, stats, run_key: str):
        self._stats, self._run_key = stats, run_key
        self.requested = False
        self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            import threading

            # Not a Ray call inside a signal handler: the main thread may be inside one.
            threading.Thread(target=self._stats.cancel.remote, args=(self._run_key,), daemon=True).start()

    def __enter__(self) -> "GracefulStop":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


PROCESS_TAG = "pid"


def process_tag() -> str:
    """``pid:<host>:<pid>:<start>`` for the flow run of this process, so a
    later run can tell that the process died (SIGKILL, OOM) with the run
    still RUNNING. ``<start>`` tells a reused pid apart."""
    import os
    import socket

    from tasks.lance_leases import process_start

    return f"{PROCESS_TAG}:{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid())}"


def _alive(pid: int, start: str) -> bool:
    import os

    from tasks.lance_leases import process_start

    now = process_start(pid)
    if now != "0":
        return now == start
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def mark_killed_runs(logger) -> int:
    """Mark CRASHED the RUNNING flow runs that a process on this host started
    and that died without ending them (the embedded API has no heartbeats to
    notice that). Returns how many."""
    import os
    import socket

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host = socket.gethostname()
    marked = 0
    with get_client(sync_client=True) as client:
        running = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
            limit=200,
        )
        for run in running:
            for tag in run.tags or []:
                parts = tag.split(":")
                if len(parts) != 4 or parts[0] != PROCESS_TAG or parts[1] != host or not parts[2].isdigit():
                    continue
                pid = int(parts[2])
                if pid == os.getpid() or _alive(pid, parts[3]):
                    continue
                client.set_flow_run_state(
                    run.id, Crashed(message=f"the process running it ({host}, pid {pid}) ended without finishing it"), force=True
                )
                logger.warning("flow run %s (%s) was left RUNNING by a process that died: marked CRASHED", run.name, run.id)
                marked += 1
    return marked


def _progress_artifact(cfg: PipelineConfig, progress: float):
    try:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(round(progress, 1), key="pipeline-progress",
                                        description=f"Node tasks finished ({len(cfg.nodes())} nodes)")
    except Exception:
        return None


@flow(
    name="kaiyuan-pipeline",
    flow_run_name=_flow_run_name,
    task_runner=DeferredRayTaskRunner(),
    # Nothing is persisted: node results hold lazy Ray datasets, which cannot
    # outlive the run (FIELD-NOTES), and data lands in Lance. Naming a result
    # storage anyway (Prefect's default path, never written to) spares the
    # engine its two reads of the server's default result storage on every
    # run's start.
    persist_result=False,
    result_storage=Path(get_current_settings().results.local_storage_path),
    log_prints=True,
)
def kaiyuan_pipeline(
    config: str,
    mode: Literal["local", "k8s"] = "local",
    ray_address: str | None = None,
    seed: int | None = None,
    preview_rows: int = 20,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Run a Kaiyuan YAML pipeline. Returns the row count, the first rows and
    per-node statistics of the result.

    ``overrides`` is merged over the YAML (nested keys or dotted paths such as
    ``{"ray.app_name": "x", "prefect.checkpoint_dir": "/ckpt"}``)."""
    import ray

    from tasks.base import STATS_ACTOR_NAME
    from tasks.stats import run_stats_actor

    logger = get_run_logger()
    cfg = load_config(config, overrides)
    if cfg.ray.block:  # `ray: {block: NAME}`: a RayCluster block fills what the YAML leaves unset
        from blocks import apply_ray_block

        apply_ray_block(cfg.ray)
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
    namespace = ray.get_runtime_context().namespace
    stats = run_stats_actor(namespace)
    run_key = uuid.uuid4().hex
    stats_name = f"{STATS_ACTOR_NAME}/{run_key}"
    futures: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    plans: dict[str, CheckpointPlan] = {}
    stop = GracefulStop(stats, run_key)
    try:
        ctx = run_context(cfg, seed, stats_name, namespace)
        check_nodes(cfg, ctx)
        plans = checkpoint_plans(cfg, ctx, logger)
        with stop, Background(logger) as background:
            background.submit(mark_killed_runs, logger)
            # A failed run still gets its tags (leaving the block waits for them).
            root = execute(cfg, ctx, preview_rows, plans, background, logger, futures, skipped)
            observations, node_tasks = ray.get(stats.finish.remote(run_key))
            summary = publish(cfg, futures, observations, node_tasks, skipped, root, plans, logger)
        if stop.requested:
            logger.warning("SIGTERM arrived after the output was committed: the run completed")
    except BaseException as exc:
        stats.snapshot.remote(run_key)  # forget this run's partial statistics
        if futures and isinstance(exc, Exception):
            _publish_failed(cfg, futures, skipped, plans, logger)
        if stop.requested and find_in_chain(exc, RunCancelled) is not None:
            from prefect.states import Cancelled

            message = "cancelled by SIGTERM before any output was committed: every output keeps its previous version"
            logger.warning(message)
            return Cancelled(message=message)
        raise
    finally:
        if started and ray.get_runtime_context().worker.mode == 0:
            ray.shutdown()
    return {
        "num_rows": root.num_rows,
        "output_path": root.output_path,
        "preview": root.preview.to_pylist(),
        "preview_columns": root.preview.column_names,
        "nodes": summary["nodes"],
    }


if __name__ != "flows.pipeline":
    # Loaded by file path (a deployment's entrypoint `flows/pipeline.py:kaiyuan_pipeline`
    # is imported under the name `pipeline`): hand out the package's flow, so
    # what Ray pickles (run_node, NodeOutput, ...) names `flows.pipeline`,
    # which Ray workers can import.
    from flows.pipeline import kaiyuan_pipeline  # noqa: E402,F811
