"""The per-run statistics actor. Nodes and the flow report into it through
``tasks.metrics.RunStatsClient``; the flow reads everything back with
``finish``.
"""

from __future__ import annotations

import pyarrow as pa
import ray

from tasks.base import Observation


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

    def rows_out(self, run) -> dict[str, int]:
        """Rows each node has put out so far in the run (its progress)."""
        return {path: obs.rows_out or 0 for path, obs in self._obs.get(run, {}).items()}

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
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tasks.base import STATS_ACTOR_NAME

    key = (ray.get_runtime_context().get_job_id(), namespace)
    handle = _HANDLES.get(key)
    if handle is None:
        _HANDLES.clear()  # handles of an earlier Ray connection are dead
        # On this driver's node: the run lives and dies with it, whereas a
        # worker node lost mid-run would take the run's statistics along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        handle = _HANDLES[key] = RunStats.options(name=STATS_ACTOR_NAME, namespace=namespace, get_if_exists=True,
                                                  scheduling_strategy=here).remote()
    return handle
