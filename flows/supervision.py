"""A run's life as a process: SIGTERM asks the run to stop cleanly, and runs
left RUNNING by a process that died are marked CRASHED."""

from __future__ import annotations


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
