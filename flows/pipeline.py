"""The Prefect flow that runs a Kaiyuan YAML recipe.

    config (flows/config.py) -> plan (flows/plan.py) -> node tasks (flows/build.py)
    -> artifacts and summary (flows/report.py)

Ray is started (or joined) by the flow body, since its address may come
from the YAML. Every Prefect and prefect-ray workaround lives in
flows/prefect_workarounds.py.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from prefect import flow, get_run_logger

from flows import prefect_workarounds
from flows.build import Submitted, cancel_node_tasks, root_result, submit_tree
from flows.plan import absolute_local_paths, make_plan, prepare_config, run_context
from flows.report import Background, bookkeeping, flow_run_name, publish, publish_failed
from flows.supervision import GracefulStop, mark_killed_runs
from tasks.base import RunCancelled, find_in_chain

# Re-exported: callers that create flow runs (the CLI, tests) tag them at creation.
from flows.report import flow_run_tags  # noqa: F401
from flows.supervision import process_tag  # noqa: F401


@flow(
    name="kaiyuan-pipeline",
    flow_run_name=flow_run_name,
    task_runner=prefect_workarounds.FlowStartedRayTaskRunner(),
    # Nothing is persisted: node results hold lazy Ray datasets, which cannot
    # outlive the run, and the data lands in Lance.
    persist_result=False,
    result_storage=prefect_workarounds.flow_result_storage(),
    log_prints=True,
)
def kaiyuan_pipeline(
    config: str,
    mode: Literal["local", "k8s"] = "local",
    ray_address: str | None = None,
    seed: int | None = None,
    preview_rows: int = 20,
    overrides: dict[str, Any] | None = None,
    work_dir: str | None = None,
) -> dict:
    """Run a Kaiyuan YAML pipeline. Returns the row count, the first rows and
    per-node statistics of the result.

    ``overrides`` is merged over the YAML (nested keys or dotted paths such as
    ``{"ray.app_name": "x", "prefect.checkpoint_dir": "/ckpt"}``). ``work_dir``
    (else ``prefect.work_dir``) is where the run keeps its intermediate state;
    by default ``.kaiyuan`` locally, ``s3://<bucket>/_kaiyuan`` in k8s mode."""
    import ray

    from flows.runtime import init_ray, prewarm_workers, resolve_ray_address
    from tasks.base import STATS_ACTOR_NAME
    from tasks.stats import run_stats_actor

    logger = get_run_logger()
    cfg = prepare_config(config, overrides, mode, work_dir)
    address = resolve_ray_address(mode, ray_address, cfg.ray.address, cfg.ray.init_kwargs)
    if mode == "local" and address:  # a Ray started elsewhere: its workers do not share this directory
        absolute_local_paths(cfg)
    started = init_ray(address, init_kwargs=cfg.ray.init_kwargs, runtime_env=cfg.ray.runtime_env, namespace=cfg.ray.namespace)
    if started:
        prewarm_workers()
    namespace = ray.get_runtime_context().namespace
    stats, run_key = run_stats_actor(namespace), uuid.uuid4().hex
    submitted, plan, stop = Submitted(), None, GracefulStop(stats, run_key)
    try:
        plan = make_plan(cfg, run_context(cfg, seed, f"{STATS_ACTOR_NAME}/{run_key}", namespace), preview_rows, logger)
        # Ctrl-C: a driver that outlives the run (the warm runner) must not
        # leave its node tasks running.
        with stop, Background(logger, on_interrupt=lambda: cancel_node_tasks(submitted)) as background:
            background.submit(mark_killed_runs, logger)
            root_future = submit_tree(plan, submitted)
            background.submit(bookkeeping, plan, submitted, root_future, lambda: ray.get(stats.rows_out.remote(run_key)))
            root = root_result(submitted, root_future)
            observations, node_tasks = ray.get(stats.finish.remote(run_key))
            summary = publish(plan, submitted, observations, node_tasks, root, logger)
        if stop.requested:
            logger.warning("SIGTERM arrived after the output was committed: the run completed")
    except BaseException as exc:
        stats.snapshot.remote(run_key)  # forget this run's partial statistics
        if plan is not None and submitted.futures and isinstance(exc, Exception):
            publish_failed(plan, submitted, logger)
        if stop.requested and find_in_chain(exc, RunCancelled) is not None:
            return _cancelled(logger)
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


def _cancelled(logger):
    from prefect.states import Cancelled

    message = "cancelled by SIGTERM before any output was committed: every output keeps its previous version"
    logger.warning(message)
    return Cancelled(message=message)


if __name__ != "flows.pipeline":
    # Loaded by file path (a deployment's entrypoint `flows/pipeline.py:kaiyuan_pipeline`
    # is imported under the name `pipeline`): hand out the package's flow, so
    # what Ray pickles names `flows.*` modules, which Ray workers can import.
    from flows.pipeline import kaiyuan_pipeline  # noqa: E402,F811
