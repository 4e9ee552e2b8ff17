"""Every place Kaiyuan Flows works around Prefect or prefect-ray, in one module.

Each workaround has a name, the measured reason in one line (2-core machine,
Prefect 3.9, prefect-ray 0.6: the minors pinned in pyproject.toml) and a
switch: ``KAIYUAN_WORKAROUNDS_OFF=name,name`` (or ``all``) turns them off, and
the flow then runs on Prefect's and prefect-ray's own code paths with the
same result (tests/test_prefect_workarounds.py). When a Prefect release
fixes the cause, delete the workaround here and nowhere else.

Two pieces here are not optional: node tasks go through prefect-ray's
private entry point (``RayTaskRunner._run_prefect_task``) whenever this
module submits them, and the task runner lets the flow body start Ray
(``RayTaskRunner`` starts it before the flow can read the address from the
YAML).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from prefect.task_runners import TaskRunner
from prefect_ray import RayTaskRunner

WORKAROUNDS: dict[str, str] = {
    "settings_dump_once": "Prefect dumps its settings to a dict for every task it submits: 0.2 s per node task on the driver",
    "settings_as_object": "each Ray worker re-validates the dumped settings (pydantic-settings re-reads the environment): 0.3 s per node task",
    "result_store_as_object": "a result store sent by block slug makes the first node task of each worker import every Prefect collection: 1.2 s",
    "untagged_task_runs": "a tagged task run checks tag concurrency limits; the first check in a worker starts a client service: 0.9-2.5 s",
    "shared_remote_function": "prefect-ray wraps each task in a new ray.remote: a GCS export, a new worker lease and a function fetch per node task",
    "lean_api_server": "Prefect's own subprocess server imports prefect.server into the driver first: 4 s of CPU before a run starts",
    "loopback_client": "on the loopback API: heartbeats cost 0.5 s per run, the system CA store 55-65 ms per client, the CSRF token 8-24 ms",
    "named_result_storage": "without a named result storage the engine reads the server's default twice at every run's start",
}


def enabled(name: str) -> bool:
    """Whether the workaround ``name`` is on (read at each use, so tests can flip it)."""
    if name not in WORKAROUNDS:
        raise KeyError(f"no workaround named {name!r}")
    off = {part.strip() for part in os.environ.get("KAIYUAN_WORKAROUNDS_OFF", "").split(",")}
    return not ({"all", name} & off)


# -- the node task's context ----------------------------------------------------


def install_settings_dump_once() -> None:
    """Dump the settings once per settings object (identity, not equality)."""
    from prefect.context import SettingsContext

    original = getattr(SettingsContext.serialize, "_kaiyuan_original", None) or SettingsContext.serialize
    if not enabled("settings_dump_once"):
        SettingsContext.serialize = original
        return
    if getattr(SettingsContext.serialize, "_kaiyuan_original", None):
        return
    dumped: dict = {}

    def dump_once(self, include_secrets: bool = True):
        hit = dumped.get(include_secrets)
        if hit is None or hit[0] is not self:
            hit = dumped[include_secrets] = (self, original(self, include_secrets=include_secrets))
        return hit[1]

    dump_once._kaiyuan_original = original
    SettingsContext.serialize = dump_once


def task_context(task, task_run_id, task_inputs) -> dict:
    """The Prefect context a node task runs in, as prefect-ray builds it, with
    the settings and the result store shipped as objects (they pickle without
    validation; a run's settings never change) and no tags (the flow run
    keeps them)."""
    from prefect.context import FlowRunContext, SettingsContext, serialize_context

    context = serialize_context(
        asset_ctx_kwargs={"task": task, "task_run_id": task_run_id, "task_inputs": task_inputs, "copy_to_child_ctx": True}
    )
    current = SettingsContext.get()
    if enabled("settings_as_object") and current is not None and context.get("settings_context"):
        context = {**context, "settings_context": {**context["settings_context"], "settings": current.settings}}
    flow_run = FlowRunContext.get()
    if (enabled("result_store_as_object") and flow_run is not None and flow_run.result_store is not None
            and "result_store" in context.get("flow_run_context", {})):
        context = {**context, "flow_run_context": {**context["flow_run_context"], "result_store": flow_run.result_store}}
    if enabled("untagged_task_runs"):
        context = {**context, "tags_context": {}}
    return context


_REMOTE_ENTRY_POINTS: dict[str, Any] = {}


def remote_entry_point(options: dict[str, Any]):
    """prefect-ray's task entry point as a Ray remote function: one per set of
    Ray options for the life of the process, or a new one per call when the
    ``shared_remote_function`` workaround is off (what prefect-ray does)."""
    import ray

    def make():
        entry = RayTaskRunner._run_prefect_task
        return ray.remote(**options)(entry) if options else ray.remote(entry)

    if not enabled("shared_remote_function"):
        return make()
    # By value: a scheduling strategy object's repr names its address.
    key = json.dumps(options or {}, sort_keys=True, default=lambda o: getattr(o, "__dict__", repr(o)))
    if key not in _REMOTE_ENTRY_POINTS:
        _REMOTE_ENTRY_POINTS[key] = make()
    return _REMOTE_ENTRY_POINTS[key]


class FlowStartedRayTaskRunner(RayTaskRunner):
    """prefect-ray's task runner, except that the flow body starts or joins
    Ray (the address is in the YAML and the CLI flags, which the runner
    cannot see when the flow run starts) and that submitting goes through
    ``task_context`` and ``remote_entry_point`` above."""

    def __enter__(self):
        TaskRunner.__enter__(self)
        self._owns_ray = False
        install_settings_dump_once()
        return self

    def duplicate(self):
        return type(self)(address=self.address, init_kwargs=self.init_kwargs)

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        """``RayTaskRunner.submit`` with this module's context and remote function."""
        from prefect.utilities.engine import collect_task_run_inputs_sync
        from prefect_ray.context import RemoteOptionsContext
        from prefect_ray.task_runners import PrefectRayFuture

        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        task_run_id = uuid.uuid4()
        task_inputs = {name: collect_task_run_inputs_sync(value, future_cls=PrefectRayFuture) for name, value in parameters.items()}
        context = task_context(task, task_run_id, task_inputs)
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        remote = remote_entry_point(RemoteOptionsContext.get().current_remote_options)
        object_ref = remote.options(name=task.name).remote(
            *upstream_refs, task=task, task_run_id=task_run_id, parameters=parameters,
            wait_for=wait_for, dependencies=dependencies, context=context,
        )
        return PrefectRayFuture(task_run_id=task_run_id, wrapped_future=object_ref)


def flow_result_storage():
    """The flow's ``result_storage``: Prefect's default local path, named (never
    written to: nothing is persisted), or None to leave it to Prefect."""
    if not enabled("named_result_storage"):
        return None
    from pathlib import Path

    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path)


# -- the embedded Prefect API ---------------------------------------------------


def start_api_server():
    """A Prefect API server for this process and its Ray workers, over the
    database in PREFECT_HOME; it answers ``wait()`` once healthy, and stops
    at interpreter exit."""
    return LeanApiServer() if enabled("lean_api_server") else _PrefectApiServer()


class _StartingServer:
    """A server whose start-up a thread waits for, so that Ray can start
    meanwhile; ``wait()`` joins it and raises what went wrong."""

    def _start_in_background(self) -> None:
        import threading

        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._start_and_record, name="prefect-api-start", daemon=True)
        self._thread.start()

    def _start_and_record(self) -> None:
        try:
            self._start()
        except BaseException as exc:  # re-raised by wait()
            self.error = exc

    def _start(self) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


class _PrefectApiServer(_StartingServer):
    """Prefect's own ``SubprocessASGIServer``."""

    def __init__(self) -> None:
        import atexit

        from prefect.server.api.server import SubprocessASGIServer

        self._server = SubprocessASGIServer(port=_free_port())  # known now: Ray workers inherit the URL
        self.api_url = self._server.api_url
        self._start_in_background()
        atexit.register(self._server.stop)

    def _start(self) -> None:
        self._server.start(timeout=180)  # a fresh database migrates first


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LeanApiServer(_StartingServer):
    """What Prefect's ``SubprocessASGIServer`` does (uvicorn over
    ``create_app`` in a subprocess), without importing ``prefect.server``
    here, and with the server's per-event writes batched."""

    def __init__(self) -> None:
        import atexit
        import subprocess
        import sys

        # The port is fixed before the server is up: Ray workers inherit the
        # URL from the environment while it starts.
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=self._environment(),
        )
        self._start_in_background()
        # Registered now, so it runs after the exit hooks Prefect registers
        # later (atexit is last-in, first-out), which flush queued logs and
        # events to this server.
        atexit.register(self.stop)

    @staticmethod
    def _environment() -> dict[str, str]:
        from prefect.settings import get_current_settings

        def default(name: str, value: str) -> str:
            return os.environ.get(name, value)

        env = {
            **os.environ,
            # Registering block types imports every installed Prefect
            # collection to hash them (2-3 s of a run's start); `prefect
            # server start` and `python -m deployments.setup` register them.
            "PREFECT_API_BLOCKS_REGISTER_ON_START": default("PREFECT_API_BLOCKS_REGISTER_ON_START", "false"),
            # Task-run events written in batches, at most a second late, not
            # one transaction each: a fifth of the server's CPU per run.
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": default("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "100"),
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": default("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL", "1"),
            # What Prefect's temporary server sets: no UI, ephemeral services.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        env.pop("PREFECT_API_URL", None)
        return env

    def _start(self) -> None:
        """Wait until the server answers /health."""
        import time
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
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

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def loopback_client_settings(api_url: str) -> dict:
    """Client settings for the embedded API (plain HTTP on the loopback, lives
    exactly as long as this process): no flow-run heartbeats (nothing could
    act on a missing one), a one-certificate CA file for the SSL context
    Prefect builds but never uses, and no CSRF token unless the server asks."""
    from prefect.settings import (
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_URL,
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
    )

    settings: dict = {PREFECT_API_URL: api_url}
    if not enabled("loopback_client"):
        return settings
    settings[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    settings[PREFECT_API_SSL_CERT_FILE] = _loopback_ca_file()
    if not get_current_settings().server.api.csrf_protection_enabled:
        settings[PREFECT_CLIENT_CSRF_SUPPORT_ENABLED] = False
    return settings


def _loopback_ca_file() -> str:
    """A CA file holding one public root certificate (the first of certifi's bundle)."""
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
