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
# The nodes' own log lines (thresholds chosen, MinHash stage times, model
# loads) go to the Prefect run they happen in, like Prefect's own; lines
# logged inside Ray Data tasks have no run to go to and stay local.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kaiyuan")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
logging.getLogger("kaiyuan").setLevel(logging.INFO)


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
    from prefect.settings import get_current_settings, temporary_settings

    from flows import prefect_workarounds

    configured = get_current_settings().api.url
    if configured:
        _probe_prefect_api(configured)
    url = configured or running_local_prefect()  # a found one has just answered its health check
    if url:
        os.environ["PREFECT_API_URL"] = url
        if configured:
            yield url
            return
        from prefect.settings import PREFECT_API_URL

        # Found running: in this process's settings too, which node tasks
        # receive with their context.
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
        return
    global _SERVER
    if _SERVER is None:
        _SERVER = prefect_workarounds.start_api_server()
    if not background:
        wait_for_api()
    url = _SERVER.api_url
    os.environ["PREFECT_API_URL"] = url  # inherited by Ray workers started below
    try:
        with temporary_settings(updates=prefect_workarounds.loopback_client_settings(url)):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


_SERVER = None  # the embedded API server of this process (prefect_workarounds.start_api_server)


def embedded_api() -> bool:
    """Whether this process started its own Prefect API (prefect_api())."""
    return _SERVER is not None


def wait_for_api() -> None:
    """Block until the local API server started by prefect_api() answers."""
    if _SERVER is not None:
        _SERVER.wait()


def resolve_ray_address(mode: str, flag: str | None, config_address: str | None,
                        init_kwargs: dict[str, Any] | None = None) -> str | None:
    """SPEC §2: k8s mode: flag, ray.address, RAY_ADDRESS, else 'auto'.
    Local mode: flag, ray.address or RAY_ADDRESS, else a Ray that
    `ray start --head` left running on this machine, else None (a new local
    Ray for this run)."""
    if mode == "k8s":
        return flag or config_address or os.environ.get("RAY_ADDRESS") or "auto"
    explicit = flag or config_address or os.environ.get("RAY_ADDRESS")
    if explicit or NEW_RAY_ONLY & set(init_kwargs or {}):
        return explicit or None
    return running_local_ray()


def finds_services() -> bool:
    """Whether a local run looks for a Ray and a Prefect server already
    running on this machine (``KAIYUAN_FIND_SERVICES=0``: never; it then
    starts its own unless told an address)."""
    return os.environ.get("KAIYUAN_FIND_SERVICES", "1") != "0"


def running_local_ray() -> str | None:
    """The address of the Ray head that `ray start --head` started on this
    machine (Ray's own record of it in its temp dir), if it answers."""
    if not finds_services():
        return None
    import ray  # noqa: F401  (first: ray's private modules do not import on their own)
    from ray._private.utils import read_ray_address

    address = read_ray_address(None)
    return address if address and _answers(address) else None


def running_local_prefect() -> str | None:
    """The API of a Prefect server running on this machine at the address
    `prefect server start` uses (PREFECT_SERVER_API_HOST/PORT, by default
    127.0.0.1:4200), if it answers its health check."""
    if not finds_services():
        return None
    import urllib.request

    from prefect.settings import get_current_settings

    api = get_current_settings().server.api
    host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host
    url = f"http://{host}:{api.port}/api"
    if not _answers(f"{host}:{api.port}"):
        return None
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(f"{url}/health", timeout=2) as response:
            return url if response.status == 200 and response.read().strip() == b"true" else None
    except OSError:
        return None


# ray.init arguments that only a Ray started by this run accepts: a recipe
# that sets them gets its own Ray rather than the running one.
NEW_RAY_ONLY = {"num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "_system_config",
                "_temp_dir", "include_dashboard", "dashboard_host", "dashboard_port", "_memory"}


def _answers(host_port: str, timeout_s: float = 0.5) -> bool:
    import socket

    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _token_auth_for_explicit_address(address: str) -> None:
    """Ray >= 2.5x turns token auth on for a local head when a token exists
    (~/.ray/auth_token), but a client given an explicit address only uses
    it with RAY_AUTH_MODE=token: without it, connecting to such a head fails
    with InvalidAuthToken. A token sent to a head without auth is ignored,
    so send it whenever one exists and the mode is not set."""
    if address in ("auto", "local") or os.environ.get("RAY_AUTH_MODE"):
        return
    import ray  # noqa: F401  (first: ray's private modules do not import on their own)
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()  # RAY_AUTH_MODE=token, and Ray's cached config re-read


# Idle Ray worker processes kept beyond one per CPU (see init_ray). Clusters
# set the same through RAY_num_workers_soft_limit (k8s/ray/raycluster.yaml).
WORKERS_ABOVE_CPUS = 8


def _with_prefect_env(env: dict) -> dict:
    """Workers of an existing cluster do not inherit this process's
    environment: hand them the Prefect API. (A Ray started here inherits it,
    and a job-level runtime_env would keep Ray's prestarted workers, started
    without it, from serving this job's tasks.)"""
    env_vars = dict(env.get("env_vars") or {})
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_HOME",
                 "PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"):
        if os.environ.get(name) and name not in env_vars:
            env_vars[name] = os.environ[name]
    return {**env, "env_vars": env_vars} if env_vars else env


def _local_ray_kwargs(kwargs: dict[str, Any]) -> None:
    """A Ray started here: its CPUs, and idle workers beyond them.

    Node tasks are Ray workers that drive Ray Data with zero CPUs, so a run
    needs more worker processes than CPUs. Ray keeps only ``num_cpus`` idle
    workers by default and kills the rest after a second, so every Ray Data
    task launched from a node task waited for a fresh Python worker (100k
    rows: 6.8 s in a worker against 1.3 s on the driver; with this setting
    1.4 s against 1.3 s)."""
    if "num_cpus" not in kwargs and os.environ.get("KAIYUAN_NUM_CPUS"):
        kwargs["num_cpus"] = int(os.environ["KAIYUAN_NUM_CPUS"])
    cpus = int(kwargs.get("num_cpus") or os.cpu_count() or 1)
    system = dict(kwargs.get("_system_config") or {})
    system.setdefault("num_workers_soft_limit", cpus + WORKERS_ABOVE_CPUS)
    kwargs["_system_config"] = system


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
    # The CLI's quiet console: Ray's notices and its workers' output stay in
    # Ray's session logs.
    quiet = os.environ.get("KAIYUAN_QUIET") == "1"
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet}
    if quiet:
        kwargs["logging_level"] = logging.ERROR
    kwargs.update(init_kwargs or {})
    env = dict(runtime_env or {})
    if address:
        kwargs["address"] = address
        env = _with_prefect_env(env)
    if env:
        kwargs["runtime_env"] = env
    if namespace:
        kwargs["namespace"] = namespace
    _check_init_kwargs(init_kwargs or {})
    if address:
        _probe_ray_address(address)
        _token_auth_for_explicit_address(address)
    else:
        _local_ray_kwargs(kwargs)
    from flows.errors import ConfigError

    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError([f"ray.address {address!r}: no Ray cluster to connect to ({exc})"]) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"ray.init_kwargs: ray.init rejected them: {exc}"]) from None
    return True


# What a node task's worker imports before its first line runs (Prefect's
# task engine, prefect-ray, the node families) and what Ray Data's read and
# write tasks import (Ray Data, pylance).
WORKER_MODULES = (
    "prefect.task_engine", "prefect_ray.task_runners", "flows.build", "flows.checkpoint",
    "tasks", "ray.data", "lance",
)


def _import_worker_modules() -> None:
    import importlib

    for name in WORKER_MODULES:
        importlib.import_module(name)


def prewarm_workers(count: int | None = None) -> list:
    """Have ``count`` (default: the node-task window) Ray workers of this
    job import what node tasks and Ray Data tasks import, on this node, while
    the run starts. Ray workers belong to one job, so every run's first node
    task would pay these imports (2-3 s here) in a fresh worker; done now
    they overlap the flow run's creation and planning, and the run's tasks
    reuse the workers (started earlier, beside the local Prefect API's own
    start, they slowed that down more than they saved). Once per Ray job;
    ``KAIYUAN_PREWARM=0`` turns it off."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    if os.environ.get("KAIYUAN_PREWARM", "1") == "0" or job in _PREWARMED_JOBS:
        return []
    _PREWARMED_JOBS.add(job)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from flows.build import node_task_window

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    warm = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_import_worker_modules)
    _PREWARMING[:] = [warm.options(name="kaiyuan-prewarm").remote() for _ in range(count or node_task_window())]
    return list(_PREWARMING)


_PREWARMING: list = []  # this process's warm-up tasks still to wait for
_PREWARMED_JOBS: set = set()


def wait_for_prewarm(timeout_s: float = 60.0) -> None:
    """Wait for the warm-up tasks before the first node task: a node task
    submitted while they import would get a fresh worker of its own, paying
    the same imports again on a busy CPU."""
    if not _PREWARMING:
        return
    import ray

    ray.wait(list(_PREWARMING), num_returns=len(_PREWARMING), timeout=timeout_s, fetch_local=False)
    _PREWARMING.clear()


# How long the CLI waits for a Ray address that does not answer.
CONNECT_TIMEOUT_S = float(os.environ.get("KAIYUAN_CONNECT_TIMEOUT_S", "60"))


def _probe_ray_address(address: str) -> None:
    """Fail within CONNECT_TIMEOUT_S, naming the address, when nothing listens
    there (ray.init keeps retrying an unreachable GCS for minutes)."""
    import socket

    from flows.errors import ConfigError

    host_port = address.split("://", 1)[-1]
    if address in ("auto", "local") or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return
    except ValueError:
        raise ConfigError([f"ray.address {address!r}: not host:port"]) from None
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError([
            f"ray.address {address!r}: cannot reach a Ray cluster there within {CONNECT_TIMEOUT_S:g} s ({reason}); "
            "check the address, or leave it unset for a local Ray (KAIYUAN_CONNECT_TIMEOUT_S sets the wait)"
        ]) from None


def _probe_prefect_api(url: str) -> None:
    """Fail within CONNECT_TIMEOUT_S, naming the URL, when the configured
    Prefect API does not answer (the client would retry for minutes)."""
    import httpx

    from flows.errors import ConfigError

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S).raise_for_status()
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code not in (401, 403):  # auth is the client's business
            raise ConfigError([f"PREFECT_API_URL {without_credentials(url)!r}: /health answered {exc.response.status_code}"]) from None
    except httpx.HTTPError as exc:
        raise ConfigError([
            f"PREFECT_API_URL {without_credentials(url)!r}: no Prefect API answers there within "
            f"{CONNECT_TIMEOUT_S:g} s ({type(exc).__name__}); start it (prefect server start) or unset "
            "PREFECT_API_URL for the embedded one"
        ]) from None


def without_credentials(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_init_kwargs(init_kwargs: dict[str, Any]) -> None:
    import difflib
    import inspect

    import ray

    from flows.errors import ConfigError

    known = inspect.signature(ray.init).parameters
    unknown = [k for k in init_kwargs if k not in known and not str(k).startswith("_")]
    if unknown:
        hints = [difflib.get_close_matches(k, list(known), n=1) for k in unknown]
        named = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints))
        raise ConfigError([f"ray.init_kwargs: unknown ray.init keyword(s) {named}"])


def configure_ray_data(
    target_block_size_mb: int | None = None,
    debug_stats: bool = False,
    read_parallelism: int | None = None,
    shuffle_strategy: str | None = None,
    data_context=None,
) -> None:
    """Ray Data settings for this process (each Prefect task running Ray Data
    is a driver of its own, so the node task calls this), or for the one
    dataset whose ``data_context`` is given."""
    from ray.data import DataContext

    ctx = data_context if data_context is not None else DataContext.get_current()
    if target_block_size_mb:
        ctx.target_max_block_size = target_block_size_mb * 1024 * 1024
    # Ray asks every read for at least 200 blocks and splits each read task's
    # output to get them; a split read cannot fuse with the maps and the
    # write after it, so every block crossed the object store (1M rows,
    # read -> Filter -> ColumnSelect -> write: 7.4 s against 4.5 s fused).
    # Two blocks per CPU keep every core busy; Lance fragments, Parquet
    # files and row groups give more tasks than that on real datasets.
    ctx.read_op_min_num_blocks = read_parallelism or default_read_parallelism()
    # Ray's default shuffle (shuffle_v2) waits on a once-a-second resource
    # poll between its stages: a 3,000-row sort took 5-7 s against 0.15 s
    # pull-based, and 1M-row Reorder 8.6 s against 1.8 s (ray.data.shuffle_strategy).
    from ray.data.context import ShuffleStrategy

    from tasks.base import DEFAULT_SHUFFLE_STRATEGY

    ctx.shuffle_strategy = ShuffleStrategy(shuffle_strategy or DEFAULT_SHUFFLE_STRATEGY)
    ctx.enable_progress_bars = os.environ.get("KAIYUAN_PROGRESS_BARS", "0") == "1"
    ctx.verbose_stats_logs = debug_stats
    # A batch function's NodeError (which names the node) reaches the flow
    # as itself, not wrapped in Ray's UserCodeException.
    ctx.raise_original_map_exception = True
    # Same input and seed, same output order.
    ctx.execution_options.preserve_order = True


def default_read_parallelism() -> int:
    """Blocks a read asks for unless ``ray.data.read_parallelism`` says:
    two per cluster CPU (see configure_ray_data)."""
    return 2 * _cluster_cpus()


def _cluster_cpus() -> int:
    import ray

    if ray.is_initialized():
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus:
            return cpus
    return os.cpu_count() or 1
