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
    from tasks.base import NodeError, RunCancelled, find_in_chain

    return find_in_chain(exc, (NodeError, ConfigError, RunCancelled)) is not None


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
        _probe_prefect_api(url)
        os.environ["PREFECT_API_URL"] = url
        yield url
        return
    global _SERVER
    if _SERVER is None:
        _SERVER = LocalApiServer()
    if not background:
        wait_for_api()
    url = _SERVER.api_url
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
    # Nor does a client fetch a CSRF token from it (one request per client,
    # 8-24 ms, first on every run's path) unless the server asks for them.
    from prefect.settings import (
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    )

    settings = get_current_settings()
    local = {PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_API_SSL_CERT_FILE: _loopback_ca_file()}
    if not settings.server.api.csrf_protection_enabled:
        local[PREFECT_CLIENT_CSRF_SUPPORT_ENABLED] = False
    try:
        with temporary_settings(updates=local):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


_SERVER: "LocalApiServer | None" = None


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


class LocalApiServer:
    """Prefect's API server (uvicorn over ``create_app``, the database in
    PREFECT_HOME) in a subprocess; a thread waits for it to answer so that
    Ray can start meanwhile (``wait()`` joins it); stopped at interpreter exit.

    This does what Prefect's own ``SubprocessASGIServer`` does, without
    importing ``prefect.server`` into the driver: that import is the whole
    server stack (SQLAlchemy models, FastAPI routers; 4 s of CPU here) in a
    process that only needs the server's URL."""

    def __init__(self) -> None:
        import atexit
        import socket
        import subprocess
        import sys
        import threading

        # The port is fixed before the server is up: Ray workers inherit the
        # URL from the environment while it starts.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.error: BaseException | None = None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=self._environment(),
        )
        self._thread = threading.Thread(target=self._wait_healthy, name="prefect-api-start", daemon=True)
        self._thread.start()
        # Registered now, so it runs after the exit hooks Prefect registers
        # later (atexit is last-in, first-out), which flush queued logs and
        # events to this server.
        atexit.register(self.stop)

    @staticmethod
    def _environment() -> dict[str, str]:
        from prefect.settings import get_current_settings

        env = {
            **os.environ,
            # Read by the server only. Registering block types imports every
            # installed Prefect collection (prefect-kubernetes, prefect-ray:
            # 2-3 s of a run's start here) to hash them; a local run uses no
            # block type it does not register itself, and `prefect server
            # start` and `python -m deployments.setup` register them.
            "PREFECT_API_BLOCKS_REGISTER_ON_START": os.environ.get("PREFECT_API_BLOCKS_REGISTER_ON_START", "false"),
            # Task-run events are written in batches, at most a second late,
            # instead of one transaction per event (Prefect's default batch
            # of 1): that was a fifth of this server's CPU per run, and it ran
            # while the chain of node-task starts competed for the same two
            # cores. Whatever is queued is flushed when the server stops.
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE":
                os.environ.get("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "100"),
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL":
                os.environ.get("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL", "1"),
            # What Prefect's temporary server sets: no UI, ephemeral services.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        env.pop("PREFECT_API_URL", None)
        return env

    def _wait_healthy(self) -> None:
        import time
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the local Prefect API server (port {self.port}) exited with code {self.process.returncode} while starting"
                    )
                try:
                    with direct.open(f"{self.api_url}/health", timeout=5) as response:
                        if response.status == 200:
                            return
                except OSError:
                    pass
                time.sleep(0.1)
            raise RuntimeError("the local Prefect API server did not answer within 180 s")
        except BaseException as exc:  # re-raised by wait_for_api
            self.error = exc

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for_api() -> None:
    """Block until the local API server started by prefect_api() answers."""
    if _SERVER is not None:
        _SERVER.wait()


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
    _check_init_kwargs(init_kwargs or {})
    if address:
        _probe_ray_address(address)
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
    from flows.config import ConfigError

    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError([f"ray.address {address!r}: no Ray cluster to connect to ({exc})"]) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"ray.init_kwargs: ray.init rejected them: {exc}"]) from None
    return True


# How long the CLI waits for a Ray address that does not answer.
CONNECT_TIMEOUT_S = float(os.environ.get("KAIYUAN_CONNECT_TIMEOUT_S", "60"))


def _probe_ray_address(address: str) -> None:
    """Fail within CONNECT_TIMEOUT_S, naming the address, when nothing listens
    there (ray.init keeps retrying an unreachable GCS for minutes)."""
    import socket

    from flows.config import ConfigError

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

    from flows.config import ConfigError

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S).raise_for_status()
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code not in (401, 403):  # auth is the client's business
            raise ConfigError([f"PREFECT_API_URL {_without_credentials(url)!r}: /health answered {exc.response.status_code}"]) from None
    except httpx.HTTPError as exc:
        raise ConfigError([
            f"PREFECT_API_URL {_without_credentials(url)!r}: no Prefect API answers there within "
            f"{CONNECT_TIMEOUT_S:g} s ({type(exc).__name__}); start it (prefect server start) or unset "
            "PREFECT_API_URL for the embedded one"
        ]) from None


def _without_credentials(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_init_kwargs(init_kwargs: dict[str, Any]) -> None:
    import difflib
    import inspect

    import ray

    from flows.config import ConfigError

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
