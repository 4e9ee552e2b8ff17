"""The warm runner: one long-lived driver that runs the CLI's local runs.

`python -m flows.services up` starts it beside the Prefect server and the Ray
head. A Ray worker belongs to one job (one driver), so a CLI run that is its
own driver starts and imports new workers every time (plus its own imports
and Ray connection): 15-20 s here even with Ray and Prefect up. The runner
stays connected, so its node-task and Ray Data workers, its imports and its
Prefect client stay warm; a run it serves takes about 2 s for the sample.

`flows/run.py` hands its arguments, directory and environment to the runner
over a Unix socket next to the Ray head's record (Ray's temp dir) and prints
what comes back; the exit code is the run's. The CLI runs the recipe itself,
as without the runner, when the runner is busy with another run, runs
older code than the CLI's (it then restarts itself), was started with other
PREFECT_*/RAY_* settings, or the run asks for what one shared driver cannot
give (--mode k8s, --ray-address, --verbose, a recipe's own ray.address,
ray.block, namespace, runtime_env or init_kwargs). ``KAIYUAN_WARM_RUNNER=0``
turns it off.

Only the standard library at module level: the CLI imports this first.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOCKET_NAME = "kaiyuan-runner.sock"
# Settings that Prefect and Ray read once at import, or that the runner's
# Ray workers read (they have the environment of `services up`, as any
# running cluster's workers do): a run needing other values than the
# runner started with cannot be served by it. The rest of the CLI's
# environment (credentials included) is the run's on the driver.
FIXED_PREFIXES = ("PREFECT_", "RAY_", "KAIYUAN_", "HF_", "TRANSFORMERS_", "NUMBA_", "OMP_")
FIXED_NAMES = ("PYTHONPATH",)
# Read by the CLI or set by importing Ray, not settings of the run.
NOT_SETTINGS = ("RAY_CLIENT_MODE", "KAIYUAN_WARM_RUNNER", "KAIYUAN_FIND_SERVICES", "KAIYUAN_DEBUG", "KAIYUAN_QUIET",
                "KAIYUAN_CONNECT_TIMEOUT_S")


def socket_path() -> Path:
    """Next to Ray's record of its head (Ray's temp dir, computed as
    ray._common.utils does, without importing Ray): one runner per head."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray" / SOCKET_NAME


def code_fingerprint() -> str:
    """The interpreter and the project's sources (paths, sizes, mtimes): a
    runner whose fingerprint differs from the CLI's runs other code."""
    digest = hashlib.sha256(f"{sys.executable}\0{sys.version}\0{ROOT}".encode())
    for package in ("flows", "tasks", "blocks", "samples"):
        for entry in sorted(_py_files(ROOT / package), key=lambda e: e.path):
            stat = entry.stat()
            digest.update(f"{entry.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _py_files(directory: Path):
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir() and entry.name != "__pycache__":
            yield from _py_files(Path(entry.path))
        elif entry.name.endswith(".py"):
            yield entry


def _fixed(name: str) -> bool:
    return (name.startswith(FIXED_PREFIXES) or name in FIXED_NAMES) and name not in NOT_SETTINGS


def fixed_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if _fixed(k)}


# -- the CLI's side ---------------------------------------------------------------


def may_delegate(args) -> bool:
    """Whether this CLI invocation may be handed to a warm runner at all."""
    if os.environ.get("KAIYUAN_WARM_RUNNER", "1") == "0" or os.environ.get("KAIYUAN_FIND_SERVICES", "1") == "0":
        return False
    if os.environ.get("RAY_ADDRESS") or args.mode != "local" or args.ray_address or args.verbose:
        return False
    return bool(args.config) and not args.check


def delegate(argv: list[str]) -> int | None:
    """Run ``argv`` in the warm runner and relay its output. Returns the exit
    code, or None when there is no runner or it declines (the caller then
    runs the recipe itself)."""
    path = socket_path()
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5)
        conn.connect(str(path))
        _send(conn, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fingerprint": code_fingerprint(),
                     "tty": sys.stderr.isatty()})
    except OSError:
        conn.close()
        return None
    # No timeout from here: the runner answers every request it took (a
    # decline, or the run), and the run may take hours.
    conn.settimeout(None)
    return _relay(conn, conn.makefile("r", encoding="utf-8"))


def _relay(conn: socket.socket, reader) -> int | None:
    """Print the run's output until its exit code (None: declined before it
    started); Ctrl-C and SIGTERM are passed to the run, which ends the way a
    CLI run of its own would."""
    from flows.errors import EXIT_INTERNAL, EXIT_INTERRUPTED

    def forward(signum, frame):
        try:
            _send(conn, {"signal": "TERM" if signum == signal.SIGTERM else "INT"})
        except OSError:
            pass

    interrupts, printed = 0, False
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                message = _receive(reader)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts > 1:  # a second Ctrl-C: stop waiting (the run is asked to stop either way)
                    print("interrupted", file=sys.stderr)
                    return EXIT_INTERRUPTED
                forward(signal.SIGINT, None)
                continue
            except OSError:
                message = None
            if message is None and interrupts == 0 and not printed:
                return None  # the runner stopped before taking the run (a restart): run it here
            if message is None:
                print("internal error: the warm runner went away mid-run (its log: "
                      f"{socket_path().with_suffix('.log')})", file=sys.stderr)
                return EXIT_INTERNAL
            if "decline" in message:
                print(f"warm runner: {message['decline']}; running here", file=sys.stderr)
                return None
            printed = True
            if "out" in message:
                sys.stdout.write(message["out"])
                sys.stdout.flush()
            elif "err" in message:
                sys.stderr.write(message["err"])
                sys.stderr.flush()
            elif "exit" in message:
                return int(message["exit"])
    finally:
        signal.signal(signal.SIGTERM, previous)
        conn.close()


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def _receive(reader) -> dict | None:
    line = reader.readline()
    return json.loads(line) if line else None


# -- the runner's side ---------------------------------------------------------------


class Declined(Exception):
    """A request the runner leaves to the CLI, and why."""


def declines(cfg) -> str | None:
    """Why a loaded recipe needs a driver of its own, if it does."""
    ray_cfg = cfg.ray
    for name in ("address", "block", "namespace", "runtime_env", "init_kwargs"):
        if getattr(ray_cfg, name, None):
            return f"the recipe sets ray.{name}"
    return None


class _ClientStream:
    """sys.stdout / sys.stderr of the runner: a serving run's output goes to
    its CLI, anything else to the runner's log. Installed before Prefect and
    logging bind to them, so their handlers follow it too."""

    def __init__(self, key: str, fallback):
        self.key, self.fallback = key, fallback
        self.client: _Client | None = None

    def write(self, text: str) -> int:
        client = self.client
        if client is None:
            return self.fallback.write(text)
        client.send({self.key: text})
        return len(text)

    def flush(self) -> None:
        if self.client is None:
            self.fallback.flush()

    def isatty(self) -> bool:
        return self.client.tty if self.client is not None else False

    def fileno(self) -> int:
        return self.fallback.fileno()

    def __getattr__(self, name):
        return getattr(self.fallback, name)


class _Client:
    """One CLI connection being served."""

    def __init__(self, conn: socket.socket, reader, tty: bool):
        self.conn, self.reader, self.tty = conn, reader, tty
        self.gone = False
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        if self.gone:
            return
        with self._lock:
            try:
                _send(self.conn, message)
            except OSError:  # the CLI went away: the run is asked to stop (see _watch)
                self.gone = True


class Runner:
    def __init__(self):
        self.launch_env = fixed_settings(dict(os.environ))
        self.fingerprint = code_fingerprint()
        self.home = os.getcwd()
        self.since = time.time()
        self.requests: list[tuple] = []  # (connection, its reader, request)
        self.wakeup = threading.Condition()
        self.busy = False
        self.restart = False
        self.serving: _Client | None = None

    # The accept thread answers at once (busy, stale, other settings) and
    # queues the rest for the main thread, which runs them one at a time
    # (signals and the flow's SIGTERM handling need the main thread).
    def accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                conn.settimeout(10)
                reader = conn.makefile("r", encoding="utf-8")
                request = _receive(reader)
                conn.settimeout(None)
                if request is None:
                    conn.close()
                    continue
                if "ping" in request:
                    _send(conn, {"pid": os.getpid(), "fingerprint": self.fingerprint, "since": self.since})
                    conn.close()
                    continue
                reason = self._refusal(request)
                if reason is not None:
                    _send(conn, {"decline": reason})
                    conn.close()
                    continue
                with self.wakeup:
                    self.busy = True
                    self.requests.append((conn, reader, request))
                    self.wakeup.notify()
            except (OSError, ValueError):
                conn.close()

    def _refusal(self, request: dict) -> str | None:
        if request.get("fingerprint") != self.fingerprint:
            with self.wakeup:
                self.restart = True
                self.wakeup.notify()
            return "it runs older code than this CLI and restarts now"
        if self.busy or self.restart:
            return "busy with another run"
        theirs = fixed_settings(request.get("env") or {})
        if theirs != self.launch_env:
            differing = sorted(k for k in set(theirs) | set(self.launch_env) if theirs.get(k) != self.launch_env.get(k))
            return f"started with other settings of {', '.join(differing)}"
        if not _ray_answers():
            with self.wakeup:  # start again, which stops where no Ray head answers
                self.restart = True
                self.wakeup.notify()
            return "its Ray head is gone"
        return None

    def main_loop(self) -> None:
        while True:
            with self.wakeup:
                while not self.requests and not self.restart:
                    self.wakeup.wait()
                if self.restart and not self.requests:
                    return
                conn, reader, request = self.requests.pop(0)
            try:
                self.serve_one(conn, reader, request)
            finally:
                conn.close()
                with self.wakeup:
                    self.busy = False

    def serve_one(self, conn: socket.socket, reader, request: dict) -> None:
        from flows import run
        from flows.errors import EXIT_INTERNAL, EXIT_INTERRUPTED

        client = _Client(conn, reader, bool(request.get("tty")))
        saved_env = dict(os.environ)
        _overlay_env(request.get("env") or {})
        code, declined = EXIT_INTERNAL, None
        try:
            os.chdir(request["cwd"])
            self.serving = client
            _STDOUT.client = _STDERR.client = client
            threading.Thread(target=_watch, args=(client,), daemon=True, name="kaiyuan-cli-watch").start()
            try:
                code = run.main(list(request["argv"]), warm_runner=True)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                code = EXIT_INTERRUPTED
        except Declined as exc:
            declined = str(exc)
        except Exception as exc:  # noqa: BLE001 - the CLI gets an answer whatever happens
            print(f"internal error in the warm runner: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            self.serving = None
            _STDOUT.client = _STDERR.client = None
            os.chdir(self.home)
            os.environ.clear()
            os.environ.update(saved_env)
        client.send({"exit": code} if declined is None else {"decline": declined})


def _overlay_env(env: dict[str, str]) -> None:
    """The CLI's environment for the run (credentials, KAIYUAN_* options);
    the settings fixed at the runner's start stay as they are (they are equal,
    or the request was declined)."""
    for name in list(os.environ):
        if name not in env and not _fixed(name):
            del os.environ[name]
    for name, value in env.items():
        if not _fixed(name):
            os.environ[name] = value


def _watch(client: _Client) -> None:
    """A signal the CLI passes on becomes that signal here (the run's own
    handlers act on it); a CLI that went away stops the run as SIGTERM does."""
    while True:
        try:
            message = _receive(client.reader)
        except (OSError, ValueError):
            message = None
        if message is None:
            client.gone = True
            if _RUNNER is not None and _RUNNER.serving is client:
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if "signal" in message and _RUNNER is not None and _RUNNER.serving is client:
            os.kill(os.getpid(), signal.SIGTERM if message["signal"] == "TERM" else signal.SIGINT)


def _ray_answers() -> bool:
    import ray

    try:
        return ray.is_initialized() and bool(ray.nodes())
    except Exception:  # noqa: BLE001 - a lost GCS shows up in many ways
        return False


_STDOUT: _ClientStream
_STDERR: _ClientStream
_RUNNER: Runner | None = None


def _on_sigterm(signum, frame) -> None:
    """Outside a run's own handler: a serving run is interrupted; an idle
    runner stops."""
    if _RUNNER is not None and _RUNNER.serving is not None:
        raise KeyboardInterrupt
    raise SystemExit(0)


def serve() -> int:
    """Connect to the running Ray and Prefect server, warm up, serve runs."""
    global _STDOUT, _STDERR, _RUNNER
    launched_with = dict(os.environ)  # a restart starts as this one did
    _STDOUT, _STDERR = _ClientStream("out", sys.stdout), _ClientStream("err", sys.stderr)
    sys.stdout, sys.stderr = _STDOUT, _STDERR
    os.environ["KAIYUAN_FIND_SERVICES"] = "1"
    sys.path.insert(0, str(ROOT))
    from flows import runtime

    runner = Runner()
    os.environ["KAIYUAN_QUIET"] = "1"
    address, api = runtime.running_local_ray(), runtime.running_local_prefect()
    if not address or not api:
        print(f"error: the warm runner needs a running Ray head and Prefect server (Ray: {address}, Prefect: {api})",
              file=sys.stderr)
        return 2
    from flows import run

    run._setup_logging(verbose=False)
    runtime.init_ray(address)
    with runtime.prefect_api():
        warm_up_workers()
        # And this driver: the nodes' metadata checks (pylance) and what
        # Prefect imports when it first creates a flow run (~5 s in all).
        _read_write_tiny()
        from flows.pipeline import kaiyuan_pipeline

        kaiyuan_pipeline.serialize_parameters({"config": "warm-up.yaml"})
    path = socket_path()
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)  # a run executes as this user: only this user may ask for one
    listener.listen(8)
    _RUNNER = runner
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C passed on by a CLI, even where `up` ran with SIGINT ignored (a
    # background job of a shell), which this process would inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=runner.accept_loop, args=(listener,), daemon=True, name="kaiyuan-accept").start()
    print(f"warm runner {os.getpid()} serving at {path}", file=sys.stderr)
    try:
        runner.main_loop()
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    if runner.restart:  # other code than the CLI's: start again on the new code
        import ray

        ray.shutdown()
        sys.stdout.flush()
        os.chdir(runner.home)
        os.execve(sys.executable, [sys.executable, "-m", "flows.warm", "serve"], launched_with)
    return 0


def warm_up_workers() -> None:
    """Run a tiny read -> write through the node-task code (no flow run) in
    as many node-task workers as run at once: they import what node tasks
    import and start Ray Data's executor, and the Ray Data workers they use
    import pylance, before the first run (which otherwise paid ~8 s of it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from flows.build import node_task_window

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    exercise = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_read_write_tiny)
    ray.get([exercise.options(name="kaiyuan-warm-up").remote() for _ in range(node_task_window())])


def _read_write_tiny() -> int:
    import tempfile

    import lance
    import pyarrow as pa
    import yaml

    from flows.build import run_node
    from flows.config import load_config
    from flows.plan import make_plan, run_context

    with tempfile.TemporaryDirectory(prefix="kaiyuan-warm-up-") as tmp:
        lance.write_dataset(pa.table({"id": list(range(64)), "text": ["warm-up"] * 64}), f"{tmp}/in.lance")
        recipe = {"pipeline": {"type": "LanceWriter", "output_path": f"{tmp}/out.lance",
                               "child_configs": [{"type": "LanceReader", "input_path": f"{tmp}/in.lance"}]}}
        Path(f"{tmp}/recipe.yaml").write_text(yaml.safe_dump(recipe))
        cfg = load_config(f"{tmp}/recipe.yaml")
        plan = make_plan(cfg, run_context(cfg, None, None, None))
        (reader,) = cfg.root.children
        read = run_node.fn(reader, [], plan.ctx)
        return run_node.fn(cfg.root, [read], plan.ctx, is_root=True, preview_rows=0).num_rows


def ping(timeout_s: float = 2.0) -> dict | None:
    """The runner's pid and code fingerprint, if one answers."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout_s)
        conn.connect(str(socket_path()))
        _send(conn, {"ping": True})
        return _receive(conn.makefile("r", encoding="utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m flows.warm serve   (started by `python -m flows.services up`)")
    sys.exit(serve())
