"""Shared machinery for model-style nodes (scorers, tokenizers).

Not a node module (the leading underscore keeps it out of discovery).

* ``resolve_model_path``: a model path may be a local file or directory, a
  ``.zip`` of one, or an object-store URI (``s3://``, ``gs://``, ...). Remote
  models are downloaded once per machine into a cache directory
  (``KAIYUAN_MODEL_CACHE``, default ``~/.cache/kaiyuan/models``) under a file
  lock, so concurrent actors on one machine download once; zips are
  extracted once likewise.
* ``ModelNode``: a ``BatchNode`` whose model is loaded **once per actor** of a
  Ray Data actor pool (``map_batches`` with a callable class and
  ``ActorPoolStrategy``), never once per block. Each load is recorded in the
  run's stats actor as the ``model_loads`` sum of the node, with the device
  the actor computes on (``model_device:<kind>[:<name>]``), so the node's
  report (a Prefect artifact) says how many times the model was loaded and
  whether it ran on GPU or CPU.
* The pool's size and resources: ``num_gpus``, ``min_actors`` and
  ``max_actors`` (``NumGpus``, ``MinActors``, ``MaxActors``: optional
  parameters a model node's parameter model may declare, extensions to SPEC
  §8) or, as before, ``concurrency``. Ray's ``cluster_resources()`` is
  cluster-wide wherever it is asked (the flow, a node task, any worker), so
  GPUs that only worker nodes have are seen and used.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import time
import zipfile
from typing import Annotated, Any, ClassVar, Mapping

import pyarrow as pa
from pydantic import Field

from tasks.base import BatchNode, Node, Observation, Report, RunContext, Stream, instrument
from tasks.storage import filesystem_for, is_object_store, normalize_uri, path_exists, resolve_storage_options

log = logging.getLogger("kaiyuan.models")

MODEL_CACHE_ENV = "KAIYUAN_MODEL_CACHE"
LOADS_KEY = "model_loads"
# One per actor load: "model_device:CPU" or "model_device:GPU:<device name>".
DEVICE_KEY = "model_device:"

# Optional actor-pool parameters of model nodes (declared in each node's
# parameter model; absent means today's behaviour).
NumGpus = Annotated[float | None, Field(ge=0, le=64, allow_inf_nan=False, description=(
    "GPUs reserved per actor of the model's pool; a fraction below 1 lets actors share a GPU. "
    "Default: 1 where the Ray cluster has GPUs (on any node) and the model can use them, else 0. "
    "0 runs on CPU; asking for GPUs on a cluster without them is an error."))]
MinActors = Annotated[int | None, Field(ge=1, le=10_000, description=(
    "smallest size of an autoscaling actor pool (default 1 when max_actors is given); "
    "instead of concurrency, which fixes the size"))]
MaxActors = Annotated[int | None, Field(ge=1, le=10_000, description=(
    "largest size of an autoscaling actor pool (default: the size concurrency would have, "
    "at least min_actors); instead of concurrency, which fixes the size"))]


def cache_root() -> str:
    root = os.environ.get(MODEL_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kaiyuan", "models")
    os.makedirs(root, exist_ok=True)
    return root


class _Lock:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.fh = open(self.path, "a+")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _download(uri: str, storage_options: Mapping[str, str]) -> str:
    """Copy a remote file or directory into the cache once; return the local path."""
    import pyarrow.fs as pafs

    key = hashlib.sha1(uri.encode()).hexdigest()[:16]
    target_dir = os.path.join(cache_root(), f"remote-{key}")
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    local = os.path.join(target_dir, name)
    done = os.path.join(target_dir, ".complete")
    os.makedirs(target_dir, exist_ok=True)
    with _Lock(os.path.join(target_dir, ".lock")):
        if os.path.exists(done):
            return local
        fs, inner = filesystem_for(uri, storage_options)
        info = fs.get_file_info(inner)
        tmp = local + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"model {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            os.makedirs(tmp, exist_ok=True)
            for item in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
                if item.type != pafs.FileType.File:
                    continue
                rel = item.path[len(inner.rstrip("/")) + 1 :]
                dest = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                pafs.copy_files(item.path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
        open(done, "w").close()
        log.info("downloaded model %s to %s", uri, local)
    return local


def _extract(zip_path: str) -> str:
    """Extract a zip once into the cache; return the model directory inside."""
    st = os.stat(zip_path)
    key = hashlib.sha1(f"{os.path.abspath(zip_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = os.path.join(cache_root(), f"zip-{key}")
    done = target + ".complete"
    with _Lock(target + ".lock"):
        if not os.path.exists(done):
            tmp = target + ".part"
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            open(done, "w").close()
    # A zip of a directory holds one top-level folder: use it.
    entries = [e for e in os.listdir(target) if not e.startswith(".") and e != "__MACOSX"]
    if len(entries) == 1 and os.path.isdir(os.path.join(target, entries[0])):
        return os.path.join(target, entries[0])
    return target


def resolve_model_path(path: str, storage_options: Mapping[str, str] | None = None) -> str:
    """A local path for a model given as a local path, a .zip or a remote URI."""
    uri = normalize_uri(path)
    if is_object_store(uri):
        uri = _download(uri, storage_options or {})
    if uri.lower().endswith(".zip") and os.path.isfile(uri):
        return _extract(uri)
    return uri


def model_exists(path: str, storage_options: Mapping[str, str]) -> bool:
    return path_exists(normalize_uri(path), storage_options)


class ModelActor:
    """The callable class of the actor pool: loads the node's model once, in
    its constructor, then runs the node's batch function on every batch."""

    def __init__(self, node: "ModelNode", ctx: RunContext):
        from tasks.metrics import stats_client

        start = time.perf_counter()
        model = node.load_model(ctx)
        seconds = time.perf_counter() - start
        kind, name = node.device(model)
        reserved = reserved_gpus()
        log.info("%s: model loaded in %.2fs, runs on %s (pid %d, Ray GPUs %s)",
                 node.path, seconds, f"{kind} ({name})" if name else kind, os.getpid(), reserved or "none")
        if kind == "CPU" and reserved:  # a GPU reserved and left idle: a setup problem (drivers, CUDA build)
            log.warning("%s: this actor holds Ray GPU(s) %s but its model runs on CPU (no usable CUDA device)",
                        node.path, reserved)
        client = stats_client(ctx)
        if client is not None:  # the load's time too, not only the count
            device_key = DEVICE_KEY + (f"{kind}:{name}" if name else kind)
            client.add_metrics(node.path, {LOADS_KEY: 1.0, device_key: 1.0}, seconds=seconds)
        self._run = instrument(node.path, lambda batch: node.transform_with(model, batch), ctx, node.observe)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._run(batch)


def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def cluster_resource(name: str) -> float:
    """The whole cluster's total of a resource (all alive nodes, wherever
    this runs); 0 without Ray."""
    try:
        import ray

        return float(ray.cluster_resources().get(name, 0) or 0) if ray.is_initialized() else 0.0
    except Exception:
        return 0.0


def largest_node(resource: str) -> float:
    """The most of a resource any one alive node has: an actor or a task
    cannot span nodes."""
    import ray

    return max((float(n["Resources"].get(resource, 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def largest_node_gpus() -> float:
    return largest_node("GPU")


def gpu_problem(per_actor: float) -> str | None:
    """Why actors asking ``per_actor`` GPUs could never be placed on the
    running Ray cluster (Ray would wait for ever), or None. None without Ray:
    the cluster is not known yet."""
    if per_actor <= 0 or not ray_running():
        return None
    total = cluster_resource("GPU")
    if not total:
        return (f"num_gpus: {per_actor:g} GPU(s) per actor asked, but the Ray cluster has no GPUs "
                f"(its resources: CPU={cluster_resource('CPU'):g}); set num_gpus: 0 to run on CPU")
    largest = largest_node_gpus()
    if per_actor > largest:
        return (f"num_gpus: {per_actor:g} GPUs per actor asked, but no node of the Ray cluster has that many "
                f"(the largest has {largest:g}, {total:g} in all)")
    return None


def reserved_gpus() -> list:
    """The Ray GPU ids reserved for this worker (empty outside Ray)."""
    try:
        import ray

        return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", [])) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - a diagnostic must never fail the actor
        return []


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """What a model node's actor pool asks of Ray."""

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float

    def strategy(self):
        import ray.data

        if self.min_size == self.max_size:
            return ray.data.ActorPoolStrategy(size=self.min_size)
        return ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size)

    def describe(self) -> str:
        size = f"{self.min_size}" if self.min_size == self.max_size else f"{self.min_size}-{self.max_size}"
        gpus = f"{self.num_gpus:g} GPU + " if self.num_gpus else ""
        return f"actor pool of {size}, {gpus}{self.num_cpus:g} CPU per actor"


def devices_text(sums: Mapping[str, float]) -> str | None:
    """``DEVICE_KEY`` sums as text: "CPU (2 actors)", "GPU (1 actor, NVIDIA H100)"."""
    parts = []
    for key, count in sorted(sums.items()):
        if key.startswith(DEVICE_KEY):
            kind, _, name = key[len(DEVICE_KEY):].partition(":")
            actors = f"{int(count)} actor{'' if int(count) == 1 else 's'}"
            parts.append(f"{kind} ({actors}, {name})" if name else f"{kind} ({actors})")
    return "; ".join(parts) or None


class ModelNode(BatchNode):
    """A batch node whose transform needs a loaded model.

    Subclasses implement ``model_uri`` (for the pre-flight check), ``load_model``,
    ``transform_with(model, batch)`` and ``output_schema`` (so the driver never
    loads a model just to learn the schema); a model that may run on a GPU
    sets ``wants_gpu`` and overrides ``device``. Their parameter model may
    declare ``concurrency``, ``num_gpus`` (``NumGpus``), ``min_actors``
    (``MinActors``) and ``max_actors`` (``MaxActors``); what it leaves out
    takes the defaults.
    """

    uses_batch_size = True
    default_batch_size: ClassVar[int | None] = None
    wants_gpu: ClassVar[bool] = False
    _model: Any = None

    # -- to implement -------------------------------------------------
    def model_uri(self) -> str:
        raise NotImplementedError

    def load_model(self, ctx: RunContext):
        raise NotImplementedError

    def transform_with(self, model, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def device(self, model) -> tuple[str, str]:
        """Where a loaded model computes: ("CPU", "") or ("GPU", device name).
        CPU unless overridden: fastText and tokenizers have no GPU code."""
        return "CPU", ""

    # -- validation ---------------------------------------------------
    @classmethod
    def validate_params(cls, p) -> list[str]:
        problems = []
        gpus = getattr(p, "num_gpus", None)
        lo, hi = getattr(p, "min_actors", None), getattr(p, "max_actors", None)
        if gpus and not cls.wants_gpu:
            problems.append(f"num_gpus must be 0: {cls.type_name} runs on CPU only (its model has no GPU code)")
        elif gpus and gpus > 1 and gpus != int(gpus):
            problems.append(f"num_gpus above 1 must be a whole number (Ray shares a GPU only in fractions below 1), got {gpus:g}")
        elif gpus and gpus < 1e-4:  # Ray's resource unit
            problems.append(f"num_gpus must be 0 or at least 0.0001, got {gpus:g}")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"min_actors ({lo}) must be <= max_actors ({hi})")
        if getattr(p, "concurrency", None) is not None and (lo is not None or hi is not None):
            problems.append("give concurrency (a pool of fixed size) or min_actors/max_actors (an autoscaling pool), not both")
        return problems

    # -- shared -------------------------------------------------------
    def storage_options(self, ctx: RunContext) -> dict:
        return resolve_storage_options(getattr(self.params, "storage_options", None), ctx.storage_options)

    def local_model(self, ctx: RunContext) -> str:
        try:
            return resolve_model_path(self.model_uri(), self.storage_options(ctx))
        except FileNotFoundError as exc:
            raise self.error(str(exc)) from None

    def check(self, ctx: RunContext) -> None:
        uri = self.model_uri()
        if not model_exists(uri, self.storage_options(ctx)):
            raise self.error(
                f"model {uri!r} does not exist (the sample models are built by `python -m flows.sample_data`)"
            )
        # Only where Ray is up (the flow's check): the CLI checks before
        # Ray starts, and apply() checks again in any case.
        self.check_gpus(self.gpus_per_actor())

    def check_gpus(self, per_actor: float) -> None:
        problem = gpu_problem(per_actor)
        if problem:
            raise self.error(problem)

    def transform(self, batch: pa.Table) -> pa.Table:
        """Direct use (unit tests, one process): load once per node instance."""
        if self._model is None:
            self._model = self.load_model(RunContext())
        return self.transform_with(self._model, batch)

    def batch_size(self, ctx: RunContext) -> int | None:
        return getattr(self.params, "batch_size", None) or self.default_batch_size or ctx.batch_size

    def gpus_per_actor(self) -> float:
        """``num_gpus`` as given, else 1 where the cluster has GPUs and the
        model can use them (SPEC §8: use the GPU when one is present)."""
        given = getattr(self.params, "num_gpus", None)
        if given is not None:
            return float(given)
        return 1.0 if self.wants_gpu and cluster_resource("GPU") else 0.0

    def pool_size(self, ctx: RunContext, gpus_per_actor: float) -> int:
        """The fixed pool size: ``concurrency``, the run's, else one actor per
        GPU share, else half the CPUs."""
        size = getattr(self.params, "concurrency", None) or ctx.concurrency
        if size:
            return int(size)
        if gpus_per_actor:
            return max(1, int(cluster_resource("GPU") // gpus_per_actor))
        return max(1, int(cluster_resource("CPU")) // 2)

    def pool_bounds(self, ctx: RunContext, gpus_per_actor: float) -> tuple[int, int]:
        lo, hi = getattr(self.params, "min_actors", None), getattr(self.params, "max_actors", None)
        size = self.pool_size(ctx, gpus_per_actor)
        if lo is None and hi is None:
            return size, size
        lo = lo or 1
        return lo, hi if hi is not None else max(lo, size)

    def pool_plan(self, ctx: RunContext) -> PoolPlan:
        gpus = self.gpus_per_actor()
        lo, hi = self.pool_bounds(ctx, gpus)
        # One core per actor, except on small clusters: a pool (at its
        # largest) may hold at most a quarter of the CPUs, so that two model
        # pools plus the reads and writes around them never starve each other
        # (on a 2-CPU machine, two pools of 1 CPU each left the writer no
        # CPU: a hang).
        total = cluster_resource("CPU") or 1.0
        cpus = round(max(0.05, min(1.0, total / (4 * hi))), 3)
        if cluster_resource("CPU") and largest_node("CPU") < 2:
            # Nodes of one CPU: any share an actor holds leaves its node
            # unable to run a one-CPU read or write task. With two pools on
            # two such nodes nothing could read any more (a hang, seen in the
            # cluster simulation); the actors reserve no CPU there.
            cpus = 0.0
        return PoolPlan(lo, hi, cpus, gpus)

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        (stream,) = inputs
        schema = self.output_schema(stream.schema)
        plan = self.pool_plan(ctx)
        self.check_gpus(plan.num_gpus)  # runs in the node's task, connected to the cluster
        log.info("%s: %s", self.path, plan.describe())
        ds = stream.ds.map_batches(
            ModelActor,
            fn_constructor_kwargs={"node": self, "ctx": ctx},
            compute=plan.strategy(),
            batch_size=self.batch_size(ctx),
            batch_format="pyarrow",
            zero_copy_batch=True,
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,  # None, not 0: what Ray asked before
        )
        return Stream(ds, schema)

    def report(self, obs: Observation) -> Report | None:
        loads = int(obs.sums.get(LOADS_KEY, 0))
        if not loads:
            return None
        lines = [f"**model:** `{self.model_uri()}`", f"**model loads:** {loads} (one per actor)"]
        devices = devices_text(obs.sums)
        if devices:
            lines.append(f"**ran on:** {devices}")
        lines.append(f"**rows:** {obs.rows_out}")
        return Report(title="Model", markdown="\n\n".join(lines))


def text_column(node: Node, batch: pa.Table, name: str) -> list[str]:
    """A text column as Python strings, nulls as "". Binary columns are decoded
    as UTF-8 with invalid bytes replaced (U+FFFD)."""
    if name not in batch.column_names:
        raise node.error(f"input_col: no column {name!r} (columns: {', '.join(batch.column_names)})")
    col = batch.column(name)
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [b.decode("utf-8", errors="replace") if b is not None else "" for b in col.to_pylist()]
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise node.error(f"input_col {name!r} must be text, got {t}")
    return [s if s is not None else "" for s in col.to_pylist()]


def require_text_field(node: Node, schema: pa.Schema, name: str) -> None:
    if name not in schema.names:
        raise node.error(f"input_col: no column {name!r} (columns: {', '.join(schema.names)})")
    t = schema.field(name).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise node.error(f"input_col {name!r} must be text, got {t}")


def with_column(batch: pa.Table, name: str, column) -> pa.Table:
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, column)
    return batch.append_column(name, column)


def schema_with(schema: pa.Schema, name: str, type_: pa.DataType) -> pa.Schema:
    field = pa.field(name, type_)
    if name in schema.names:
        return schema.set(schema.get_field_index(name), field)
    return schema.append(field)
