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
def prefect_api(*, background: bool = False) -> Iterator[str]:
    """Make sure this process and every Ray worker talk to one Prefect API.

    With ``PREFECT_API_URL`` set, that server is used. Otherwise a local API
    server is started once for this run over the on-disk database in
    ``PREFECT_HOME`` (so history persists and ``prefect server start`` shows
    it later), instead of Prefect's default of one temporary server per
    process, which would start another one in every Ray worker.

    With ``background=True`` the URL is yielded while the server is still
    starting (about 10 s here), so the caller can start Ray meanwhile; it
    must call ``wait_for_api()`` before talking to Prefect.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if url:
        os.environ["PREFECT_API_URL"] = url
        yield url
        return
    global _SERVER, _STARTING
    if _SERVER is None:
        from prefect.server.api.server import SubprocessASGIServer

        _SERVER = SubprocessASGIServer()
        if _SERVER.port is None:  # fixed now: Ray workers inherit the URL before the server is up
            _SERVER.port = _SERVER.find_available_port()
        # Stopped at interpreter exit, *after* Prefect's own exit hooks have
        # flushed queued logs and events to it.
        _STARTING = _ServerStart(_SERVER)
    if not background:
        wait_for_api()
    url = f"http://127.0.0.1:{_SERVER.port}/api"
    os.environ["PREFECT_API_URL"] = url  # inherited by Ray workers started below
    # No flow-run heartbeats against the embedded API: it lives exactly as
    # long as this process, so nothing could act on a missing heartbeat, and
    # the engine waits up to a second for the heartbeat thread at the end of
    # every run (about 0.5 s of a short local run).
    # The embedded API is plain HTTP on the loopback interface, so no
    # certificate is ever verified; Prefect still builds an SSL context for
    # every client it makes, which reads the whole system CA store (55-65 ms
    # each, two per node task: a quarter of a lazy node task's time). With a
    # CA file of one certificate the unused context costs 1 ms.
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    local = {PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_API_SSL_CERT_FILE: _loopback_ca_file()}
    try:
        with temporary_settings(updates=local):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


_SERVER = None
_STARTING = None


def _loopback_ca_file() -> str:
    """A CA file holding one public root certificate (the first of certifi's
    bundle), for the SSL context Prefect builds but never uses against the
    plain-HTTP loopback API."""
    import re
    import tempfile

    import certifi

    path = os.path.join(tempfile.gettempdir(), f"kaiyuan-loopback-ca-{os.getuid()}.pem")
    if not os.path.exists(path):
        with open(certifi.where()) as f:
            first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", f.read(), re.S)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(first.group(0))
        os.replace(tmp, path)
    return path


class _ServerStart:
    """The embedded API server's start, run in a thread (see prefect_api)."""

    def __init__(self, server):
        import threading

        self.server, self.port, self.error = server, server.port, None
        self.thread = threading.Thread(target=self.run, name="prefect-api-start", daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            self.server.start(timeout=120)
        except BaseException as exc:  # re-raised by wait_for_api
            self.error = exc


def wait_for_api() -> None:
    """Block until the embedded API server started by prefect_api() answers."""
    start = _STARTING
    if start is None:
        return
    start.thread.join()
    if start.error is not None:
        raise start.error
    if start.server.port != start.port:
        # Prefect retries on another port when the chosen one was taken in
        # the meantime; workers started already would hold the old URL.
        raise RuntimeError(f"the local Prefect API moved from port {start.port} to {start.server.port} while starting; run again")


def resolve_ray_address(mode: str, flag: str | None, config_address: str | None) -> str | None:
    """SPEC §2: k8s mode: flag, ray.address, RAY_ADDRESS, else 'auto'.
    Local mode: flag or ray.address, else None (a new local Ray)."""
    if mode == "k8s":
        return flag or config_address or os.environ.get("RAY_ADDRESS") or "auto"
    return flag or config_address or None


# Idle Ray worker processes kept beyond one per CPU (see init_ray). Clusters
# set the same through RAY_num_workers_soft_limit (k8s/ray/raycluster.yaml).
WORKERS_ABOVE_CPUS = 8


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
    if address:
        kwargs["address"] = address
        # Workers of an existing cluster do not inherit this process's
        # environment: hand them the Prefect API. A Ray started here inherits
        # it, and a job-level runtime_env would keep Ray's prestarted workers
        # (started without it) from serving this job's tasks.
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
    if not address:
        if "num_cpus" not in kwargs and os.environ.get("KAIYUAN_NUM_CPUS"):
            kwargs["num_cpus"] = int(os.environ["KAIYUAN_NUM_CPUS"])
        cpus = int(kwargs.get("num_cpus") or os.cpu_count() or 1)
        system = dict(kwargs.get("_system_config") or {})
        # Node tasks are Ray workers that drive Ray Data with zero CPUs, so a
        # run needs more worker processes than CPUs. Ray keeps only `num_cpus`
        # idle workers by default and kills the rest after a second, so every
        # Ray Data task launched from a node task waited for a fresh Python
        # worker (100k rows: 6.8 s in a worker against 1.3 s on the driver;
        # with this setting 1.4 s against 1.3 s).
        system.setdefault("num_workers_soft_limit", cpus + WORKERS_ABOVE_CPUS)
        kwargs["_system_config"] = system
    ray.init(**kwargs)
    return True


def configure_ray_data(
    target_block_size_mb: int | None = None,
    debug_stats: bool = False,
    read_parallelism: int | None = None,
    shuffle_strategy: str | None = None,
) -> None:
    """Ray Data settings for this process (each Prefect task running Ray Data
    is a driver of its own, so the node task calls this too)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if target_block_size_mb:
        ctx.target_max_block_size = target_block_size_mb * 1024 * 1024
    # Ray asks every read for at least 200 blocks and splits each read task's
    # output to get them; a split read cannot fuse with the maps and the
    # write after it, so every block crossed the object store (1M rows,
    # read -> Filter -> ColumnSelect -> write: 7.4 s against 4.5 s fused).
    # Two blocks per CPU keep every core busy; Lance fragments, Parquet
    # files and row groups give more tasks than that on real datasets.
    ctx.read_op_min_num_blocks = read_parallelism or 2 * _cluster_cpus()
    # Ray's default shuffle (shuffle_v2) waits on a once-a-second resource
    # poll between its stages: a 3,000-row sort took 5-7 s against 0.15 s
    # pull-based, and 1M-row Reorder 8.6 s against 1.8 s (ray.data.shuffle_strategy).
    from ray.data.context import ShuffleStrategy

    from tasks.base import DEFAULT_SHUFFLE_STRATEGY

    ctx.shuffle_strategy = ShuffleStrategy(shuffle_strategy or DEFAULT_SHUFFLE_STRATEGY)
    ctx.enable_progress_bars = os.environ.get("KAIYUAN_PROGRESS_BARS", "0") == "1"
    ctx.verbose_stats_logs = debug_stats
    # Same input and seed, same output order.
    ctx.execution_options.preserve_order = True


def _cluster_cpus() -> int:
    import ray

    if ray.is_initialized():
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus:
            return cpus
    return os.cpu_count() or 1
