"""The per-run statistics actor, and the typed client nodes report through.

Nodes report with ``Node.report_metrics`` (and, implicitly, their batch
functions); the flow records how each node's task ended with
``RunStatsClient.node_task`` and reads everything back with ``finish``.
"""

from __future__ import annotations

import pyarrow as pa
import ray

from tasks.base import Observation, RunContext


@ray.remote(num_cpus=0)
class RunStats:
    """Collects rows in/out, time and observations per run and node path.
    One actor per Ray session serves every run (keyed by run)."""

    def __init__(self):
        self._obs: dict[str, dict[str, Observation]] = {}
        self._heads: dict[str, dict[str, list[pa.Table]]] = {}
        self._tasks: dict[str, dict[str, tuple]] = {}
        self._cancelled: set[str] = set()

    def cancel(self, run) -> None:
        """Ask the run to stop: its batch functions and writers see it next time they report."""
        self._cancelled.add(run)

    def cancelled(self, run) -> bool:
        return run in self._cancelled

    def record(self, run, path, rows_in, rows_out, seconds, head, sums, schema, head_limit=0) -> bool:
        """Add one batch's figures; returns whether the run was cancelled."""
        obs = self._obs.setdefault(run, {}).setdefault(path, Observation(rows_out=0))
        if rows_in is not None:
            obs.rows_in = (obs.rows_in or 0) + rows_in
        obs.rows_out = (obs.rows_out or 0) + rows_out
        obs.seconds += seconds
        obs.batches += 1
        for col, value in sums.items():
            obs.sums[col] = obs.sums.get(col, 0.0) + value
        if schema is not None and obs.schema is None:
            obs.schema = schema
        if head is not None and head.num_rows:
            heads = self._heads.setdefault(run, {}).setdefault(path, [])
            have = sum(h.num_rows for h in heads)
            if have < head_limit:
                heads.append(head.slice(0, head_limit - have))
        return run in self._cancelled

    def node_task(self, run, path, seconds, status, rows):
        """How a node's task ended (its time, status and row count if known).
        The flow reads this here rather than fetching the task's result, which
        holds a Ray dataset: unpickling that on the driver imports Ray Data
        and lance-ray there (2-3 CPU-s on a cold run) for three numbers."""
        self._tasks.setdefault(run, {})[path] = (seconds, status, rows)

    def finish(self, run) -> tuple[dict[str, Observation], dict[str, tuple]]:
        """The run's observations and node-task outcomes; forgets the run."""
        self._cancelled.discard(run)
        return self.snapshot(run), self._tasks.pop(run, {})

    def snapshot(self, run) -> dict[str, Observation]:
        """The run's observations; forgets them."""
        self._cancelled.discard(run)
        obs = self._obs.pop(run, {})
        for path, heads in self._heads.pop(run, {}).items():
            obs[path].head = pa.concat_tables(heads, promote_options="permissive")
        return obs


_HANDLES: dict = {}


def run_stats_actor(namespace: str | None):
    """The stats actor of this driver process (created on first use).

    The handle is kept for the life of the Ray connection: a named actor
    dies with its last handle, so each run would otherwise end it and the
    next run wait for a fresh worker process (seconds on a busy 2-core
    machine) before its first node task could start."""
    import ray

    from tasks.base import STATS_ACTOR_NAME

    key = (ray.get_runtime_context().get_job_id(), namespace)
    handle = _HANDLES.get(key)
    if handle is None:
        _HANDLES.clear()  # handles of an earlier Ray connection are dead
        handle = _HANDLES[key] = RunStats.options(name=STATS_ACTOR_NAME, namespace=namespace, get_if_exists=True).remote()
    return handle



class RunStatsClient:
    """The session's stats actor, bound to one run. One long-lived actor serves
    every run, so a run does not pay for starting an actor process. Every
    call waits for the actor, so what was reported is there when the flow
    reads it after the root."""

    def __init__(self, actor, run_key: str):
        self._actor, self._run_key = actor, run_key

    def record_batch(
        self,
        node_path: str,
        *,
        rows_in: int | None = None,
        rows_out: int = 0,
        seconds: float = 0.0,
        head: pa.Table | None = None,
        sums: dict[str, float] | None = None,
        schema: pa.Schema | None = None,
        head_limit: int = 0,
    ) -> bool:
        """Add one batch's figures to ``node_path``; returns whether the run
        was cancelled (the caller stops)."""
        ref = self._actor.record.remote(
            self._run_key, node_path, rows_in, rows_out, seconds, head, dict(sums or {}), schema, head_limit
        )
        return bool(ray.get(ref))

    def add_metrics(self, node_path: str, sums: dict[str, float], seconds: float = 0.0) -> None:
        """Add named sums (and time spent) to ``node_path``'s observation."""
        self.record_batch(node_path, seconds=seconds, sums=sums)

    def node_task(self, node_path: str, seconds: float, status: str, rows: int | None) -> None:
        """How a node's task ended (see ``RunStats.node_task``)."""
        ray.get(self._actor.node_task.remote(self._run_key, node_path, seconds, status, rows))

    def cancelled(self) -> bool:
        """Whether the run was asked to stop (see ``RunStats.cancel``)."""
        return bool(ray.get(self._actor.cancelled.remote(self._run_key)))


_CLIENTS: dict[tuple[str, str | None], RunStatsClient] = {}


def client_for(stats_actor: str, namespace: str | None) -> RunStatsClient:
    """The client for ``stats_actor`` = ``<actor name>/<run key>`` (see
    ``RunContext.stats_actor``); one per worker process and run."""
    key = (stats_actor, namespace)
    client = _CLIENTS.get(key)
    if client is None:
        actor_name, _, run_key = stats_actor.partition("/")
        client = _CLIENTS[key] = RunStatsClient(ray.get_actor(actor_name, namespace=namespace), run_key)
    return client


def stats_client(ctx: RunContext) -> RunStatsClient | None:
    """The run's stats client, or None when the run collects no stats."""
    if ctx.stats_actor is None:
        return None
    return client_for(ctx.stats_actor, ctx.ray_namespace)
