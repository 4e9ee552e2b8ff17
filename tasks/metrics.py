"""The typed client through which nodes and the flow report into the run's
statistics actor (``tasks.stats.RunStats``). Imports nothing from the rest
of ``tasks``, so ``tasks.base`` can use it."""

from __future__ import annotations

import pyarrow as pa


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
        return bool(_ray().get(ref))

    def add_metrics(self, node_path: str, sums: dict[str, float], seconds: float = 0.0) -> None:
        """Add named sums (and time spent) to ``node_path``'s observation."""
        self.record_batch(node_path, seconds=seconds, sums=sums)

    def node_task(self, node_path: str, seconds: float, status: str, rows: int | None) -> None:
        """How a node's task ended (see ``RunStats.node_task``)."""
        _ray().get(self._actor.node_task.remote(self._run_key, node_path, seconds, status, rows))

    def cancelled(self) -> bool:
        """Whether the run was asked to stop (see ``RunStats.cancel``)."""
        return bool(_ray().get(self._actor.cancelled.remote(self._run_key)))


_CLIENTS: dict[tuple[str, str | None], RunStatsClient] = {}


def client_for(stats_actor: str, namespace: str | None) -> RunStatsClient:
    """The client for ``stats_actor`` = ``<actor name>/<run key>`` (see
    ``RunContext.stats_actor``); one per worker process and run."""
    key = (stats_actor, namespace)
    client = _CLIENTS.get(key)
    if client is None:
        actor_name, _, run_key = stats_actor.partition("/")
        client = _CLIENTS[key] = RunStatsClient(_ray().get_actor(actor_name, namespace=namespace), run_key)
    return client


def stats_client(ctx) -> RunStatsClient | None:
    """The stats client of the run ``ctx`` (a ``tasks.base.RunContext``), or
    None when the run collects no stats."""
    if ctx.stats_actor is None:
        return None
    return client_for(ctx.stats_actor, ctx.ray_namespace)


def _ray():
    import ray  # lazily: nodes are defined and validated without Ray

    return ray
