"""Process-level set-up: one Prefect API per run, Ray start/connect, Ray Data tuning."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

log = logging.getLogger("kaiyuan.runtime")

# Prefect phones home unless told not to; these machines have no internet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A busy 2-core machine can take longer than Ray's default to start a raylet.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


class _UserErrorFilter(logging.Filter):
    """Drop the traceback from Prefect's log records when the error is a user
    mistake (a NodeError or ConfigError): the message names the node already."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_user_error(exc):
            record.exc_info = None
            record.exc_text = None
        return True


def _is_user_error(exc: BaseException) -> bool:
    from flows.config import ConfigError
    from tasks.base import NodeError

    seen: set[int] = set()
    stack: list = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (NodeError, ConfigError)):
            return True
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return False


def quiet_user_errors() -> None:
    """Install the filter on Prefect's run loggers (idempotent; call it in
    every process that runs flows or node tasks)."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.task_engine", "prefect.flow_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorFilter) for f in logger.filters):
            logger.addFilter(_UserErrorFilter())


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Make sure this process and every Ray worker talk to one Prefect API.

    With ``PREFECT_API_URL`` set, that server is used. Otherwise a local API
    server is started once for this run over the on-disk database in
    ``PREFECT_HOME`` (so history persists and ``prefect server start`` shows
    it later), instead of Prefect's default of one temporary server per
    process, which would start another one in every Ray worker.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if url:
        os.environ["PREFECT_API_URL"] = url
        yield url
        return
    global _SERVER
    if _SERVER is None:
        from prefect.server.api.server import SubprocessASGIServer

        _SERVER = SubprocessASGIServer()
        # Stopped at interpreter exit, *after* Prefect's own exit hooks have
        # flushed queued logs and events to it.
        _SERVER.start(timeout=120)
    url = _SERVER.api_url
    os.environ["PREFECT_API_URL"] = url  # inherited by Ray workers started below
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


_SERVER = None


def resolve_ray_address(mode: str, flag: str | None, config_address: str | None) -> str | None:
    """SPEC §2: k8s mode: flag, ray.address, RAY_ADDRESS, else 'auto'.
    Local mode: flag or ray.address, else None (a new local Ray)."""
    if mode == "k8s":
        return flag or config_address or os.environ.get("RAY_ADDRESS") or "auto"
    return flag or config_address or None


def init_ray(
    address: str | None,
    *,
    init_kwargs: dict[str, Any] | None = None,
    runtime_env: dict[str, Any] | None = None,
    namespace: str | None = None,
) -> bool:
    """Start or connect to Ray. Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    kwargs.update(init_kwargs or {})
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_HOME"):
        if os.environ.get(name) and name not in env_vars:
            env_vars[name] = os.environ[name]
    if env_vars:
        env["env_vars"] = env_vars
    if env:
        kwargs["runtime_env"] = env
    if namespace:
        kwargs["namespace"] = namespace
    if address:
        kwargs["address"] = address
    elif "num_cpus" not in kwargs and os.environ.get("KAIYUAN_NUM_CPUS"):
        kwargs["num_cpus"] = int(os.environ["KAIYUAN_NUM_CPUS"])
    ray.init(**kwargs)
    return True


def configure_ray_data(target_block_size_mb: int | None, debug_stats: bool = False) -> None:
    """Ray Data settings for this process (each Prefect task running Ray Data
    is a driver of its own, so the node task calls this too)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if target_block_size_mb:
        ctx.target_max_block_size = target_block_size_mb * 1024 * 1024
    ctx.enable_progress_bars = os.environ.get("KAIYUAN_PROGRESS_BARS", "0") == "1"
    ctx.verbose_stats_logs = debug_stats
    # Same input and seed, same output order.
    ctx.execution_options.preserve_order = True
