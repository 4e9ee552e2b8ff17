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
  run's stats actor as the ``model_loads`` sum of the node, so the node's
  report (a Prefect artifact) says how many times the model was loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
import zipfile
from typing import Any, ClassVar, Mapping

import pyarrow as pa

from tasks.base import BatchNode, Node, Observation, Report, RunContext, Stream, instrument
from tasks.storage import filesystem_for, is_object_store, normalize_uri, path_exists, resolve_storage_options

log = logging.getLogger("kaiyuan.models")

MODEL_CACHE_ENV = "KAIYUAN_MODEL_CACHE"
LOADS_KEY = "model_loads"


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
        log.info("%s: model loaded in %.2fs (pid %d)", node.path, seconds, os.getpid())
        client = stats_client(ctx)
        if client is not None:  # the load's time too, not only the count
            client.add_metrics(node.path, {LOADS_KEY: 1.0}, seconds=seconds)
        self._run = instrument(node.path, lambda batch: node.transform_with(model, batch), ctx, node.observe)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._run(batch)


def cluster_resource(name: str) -> float:
    try:
        import ray

        return float(ray.cluster_resources().get(name, 0) or 0) if ray.is_initialized() else 0.0
    except Exception:
        return 0.0


class ModelNode(BatchNode):
    """A batch node whose transform needs a loaded model.

    Subclasses implement ``model_uri`` (for the pre-flight check), ``load_model``,
    ``transform_with(model, batch)`` and ``output_schema`` (so the driver never
    loads a model just to learn the schema).
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

    def transform(self, batch: pa.Table) -> pa.Table:
        """Direct use (unit tests, one process): load once per node instance."""
        if self._model is None:
            self._model = self.load_model(RunContext())
        return self.transform_with(self._model, batch)

    def batch_size(self, ctx: RunContext) -> int | None:
        return getattr(self.params, "batch_size", None) or self.default_batch_size or ctx.batch_size

    def pool_size(self, ctx: RunContext, gpus: float) -> int:
        size = getattr(self.params, "concurrency", None) or ctx.concurrency
        if size:
            return int(size)
        if gpus:
            return max(1, int(gpus))
        return max(1, int(cluster_resource("CPU")) // 2)

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        import ray.data

        (stream,) = inputs
        schema = self.output_schema(stream.schema)
        gpus = cluster_resource("GPU") if self.wants_gpu else 0.0
        size = self.pool_size(ctx, gpus)
        # One core per actor, except on small clusters: a pool may hold at
        # most a quarter of the CPUs, so that two model pools plus the reads
        # and writes around them never starve each other (on a 2-CPU
        # machine, two pools of 1 CPU each left the writer no CPU: a hang).
        total = cluster_resource("CPU") or 1.0
        cpus = round(max(0.05, min(1.0, total / (4 * size))), 3)
        remote: dict[str, Any] = {"num_cpus": cpus}
        if gpus:
            remote["num_gpus"] = 1
        ds = stream.ds.map_batches(
            ModelActor,
            fn_constructor_kwargs={"node": self, "ctx": ctx},
            compute=ray.data.ActorPoolStrategy(size=size),
            batch_size=self.batch_size(ctx),
            batch_format="pyarrow",
            zero_copy_batch=True,
            **remote,
        )
        return Stream(ds, schema)

    def report(self, obs: Observation) -> Report | None:
        loads = int(obs.sums.get(LOADS_KEY, 0))
        if not loads:
            return None
        return Report(
            title="Model",
            markdown=f"**model:** `{self.model_uri()}`\n\n**model loads:** {loads} (one per actor)\n\n**rows:** {obs.rows_out}",
        )


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
