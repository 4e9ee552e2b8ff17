"""What counts as a user error, how it is worded, and the exit code it gives.

Ray and Prefect wrap the errors nodes raise, so every question here walks
the exception chain once (``tasks.base.find_in_chain``). A user error gets
a one-paragraph message and no traceback; it is never retried.
"""

from __future__ import annotations

import logging

from tasks.base import NodeError, RunCancelled, find_in_chain
from tasks.storage import StorageConfigError


class ConfigError(Exception):
    """A user mistake in a config: printed without a traceback, exit code 2."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid pipeline config {source}" if source else "invalid pipeline config"
        body = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{head}:\n{body}")


# Exit codes of flows/run.py.
EXIT_OK, EXIT_NODE_FAILED, EXIT_INVALID, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_CANCELLED = 0, 1, 2, 3, 130, 143

CONFIG_ERRORS = (ConfigError, StorageConfigError)  # found before the run starts: exit 2
USER_ERRORS = (*CONFIG_ERRORS, NodeError, RunCancelled)


def user_error(exc: BaseException) -> BaseException | None:
    """The user error (bad config, bad data, a stop request) behind ``exc``, if any."""
    return find_in_chain(exc, USER_ERRORS)


def user_message(exc: BaseException) -> str | None:
    """The message for a user error or a node failure found anywhere in the chain."""
    found = user_error(exc)
    if isinstance(found, NodeError):
        # From its fields: a NodeError raised in a Ray task arrives as
        # RayTaskError(NodeError), whose str() is the worker's traceback.
        return f"node failed: {found.node_path}: {found.problem}"
    return None if found is None else str(found)


def exit_code(exc: BaseException) -> int:
    """A config mistake found before the run is 2, a node that failed while
    running 1, a cancelled run 143, anything else 3 (an internal error)."""
    found = user_error(exc)
    if isinstance(found, ConfigError):
        return EXIT_INVALID
    if isinstance(found, RunCancelled):
        return EXIT_CANCELLED
    return EXIT_INTERNAL if found is None else EXIT_NODE_FAILED


class _UserErrorFilter(logging.Filter):
    """Drop the traceback from Prefect's log records of a user error: the
    message names the node already."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and user_error(exc) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    """Install the filter on Prefect's run loggers (idempotent; every process
    that runs flows or node tasks calls it)."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.task_engine", "prefect.flow_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorFilter) for f in logger.filters):
            logger.addFilter(_UserErrorFilter())


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry transient failures, never a user error
    (it fails the same way again) or a cancelled run."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not (isinstance(exc, BaseException) and user_error(exc) is not None)
