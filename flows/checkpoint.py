"""Node checkpoints and resume: what is flow-specific about them.

Nodes that materialise (writers in ``overwrite`` mode, node classes with
``checkpoint_by_default = True`` such as MinHash, and any node marked
``checkpoint: true`` in the YAML) persist their output when
``prefect.checkpoint_dir`` is set:

* a non-writer node's output is written as a Lance dataset under
  ``<checkpoint_dir>/`` and the parent reads it back;
* a writer's output *is* a Lance dataset; the checkpoint records its URI and
  the version this run committed.

The mechanism (write, verify, publish a marker ``<Type>-<key>.json``
atomically, verify again on reuse) is tasks/checkpoints.py, shared with
MinHash's signatures. What is here: the key of a node, a hash of its type
and parameters, the run seed and, recursively, the keys of its children; a
reader's key also covers the versions of its inputs (Lance version, or size
and mtime of files). Changing one node's parameters therefore changes its key
and the keys of everything above it, nothing below. A re-run reuses every
checkpoint whose marker matches and whose dataset is still at the recorded
version, and computes nothing underneath it.

Also here: ``redact``/``node_parameters`` (parameters shown in the UI) and
``inject_fault``, a test and drill hook driven by ``KAIYUAN_FAULT_INJECT``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Any

import pyarrow as pa

from flows.config import NodeSpec, PipelineConfig
from tasks.base import Node, Stream
from tasks.checkpoints import Checkpoint, Incomplete, write_lance

log = logging.getLogger("kaiyuan.checkpoints")

KEY_VERSION = 1


def materialises(spec: NodeSpec) -> bool:
    return bool(spec.checkpoint or spec.cls.checkpoint_by_default or is_plain_writer(spec))


def is_plain_writer(spec: NodeSpec) -> bool:
    """A writer whose output is one Lance dataset it overwrites (re-running it
    with the same inputs gives the same dataset, so it can be skipped)."""
    writes_one_dataset = spec.cls.output_uri is not Node.output_uri
    return bool(spec.cls.is_writer and writes_one_dataset and getattr(spec.params, "mode", None) == "overwrite")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


def _input_versions(spec: NodeSpec, storage_options: dict) -> list[Any] | None:
    """Versions of a leaf's inputs (None if they cannot be determined)."""
    from tasks.readers import detect_format
    from tasks.storage import expand_paths, filesystem_for, normalize_uri, resolve_storage_options

    raw = getattr(spec.params, "input_path", None)
    if raw is None:
        return []
    paths = [normalize_uri(p) for p in (raw if isinstance(raw, list) else [raw])]
    try:
        so = dict(resolve_storage_options(getattr(spec.params, "storage_options", None), storage_options))
        out: list[Any] = []
        for path in expand_paths(paths, so):
            if detect_format(path) == "lance":
                import lance

                ds = lance.dataset(path, storage_options=so or None)
                out.append([path, "lance", ds.version, str(ds.versions()[-1]["timestamp"]) if ds.versions() else None])
            else:
                import pyarrow.fs as pafs

                fs, inner = filesystem_for(path, so)
                info = fs.get_file_info(inner)
                if info.type == pafs.FileType.Directory:
                    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                    out.append([path, "dir", sorted((i.path, i.size, str(i.mtime)) for i in infos)])
                else:
                    out.append([path, "file", info.size, str(info.mtime)])
        return out
    except Exception:  # unknown inputs: never reuse anything above them
        return None


def node_keys(cfg: PipelineConfig, seed: int, storage_options: dict) -> dict[str, str | None]:
    """A content key per node path (None where an input version is unknown)."""
    keys: dict[str, str | None] = {}

    def key(spec: NodeSpec) -> str | None:
        child_keys = [key(c) for c in spec.children]
        inputs = _input_versions(spec, storage_options) if not spec.children else []
        if inputs is None or any(k is None for k in child_keys):
            keys[spec.path] = None
            return None
        doc = {
            "v": KEY_VERSION,
            "type": spec.type_name,
            "params": spec.params.model_dump(mode="json"),
            "seed": seed,
            "children": child_keys,
            "inputs": inputs,
        }
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]
        keys[spec.path] = digest
        return digest

    key(cfg.root)
    return keys


class CheckpointStore:
    """The node checkpoints under one directory (local or object store): one
    ``tasks.checkpoints.Checkpoint`` per node key."""

    def __init__(self, root: str, storage_options: dict | None = None):
        from tasks.storage import normalize_uri

        self.root = normalize_uri(root).rstrip("/")
        self.storage_options = dict(storage_options or {})

    def _name(self, spec: NodeSpec, key: str) -> str:
        return f"{self.root}/{_slug(spec.type_name)}-{key}"

    def checkpoint(self, spec: NodeSpec, key: str) -> Checkpoint:
        return Checkpoint(self._name(spec, key) + ".json", self.storage_options, spec.path)

    def data_uri(self, spec: NodeSpec, key: str) -> str:
        """A new dataset for this node's output (one per run: concurrent runs
        never share a half-written one)."""
        return self.checkpoint(spec, key).private_uri(f"{_slug(spec.type_name)}-{key}")

    def lookup(self, spec: NodeSpec, key: str | None, storage_options: dict | None = None) -> dict | None:
        """The marker of a usable checkpoint, else None. ``storage_options``:
        the node's own, for a writer's output."""
        if not key:
            return None
        return self.checkpoint(spec, key).lookup(storage_options=storage_options)

    def save(self, spec: NodeSpec, key: str, uri: str, version: int, rows: int, kind: str, seconds: float,
             storage_options: dict | None = None) -> None:
        """Verify the dataset at ``uri`` and publish its marker. A dataset that
        fails verification is logged and left unpublished: the run goes on,
        the next one recomputes the node. ``storage_options``: the node's own,
        for a writer's output (the run's when not given)."""
        meta = {
            "node": spec.path,
            "type": spec.type_name,
            "key": key,
            "uri": uri,
            "kind": kind,
            "seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        so = self.storage_options if storage_options is None else storage_options
        try:
            self.checkpoint(spec, key).publish(uri, rows, meta, version=version, storage_options=so)
        except Incomplete as exc:
            log.warning("%s: checkpoint not saved: %s", spec.path, exc)

    def read(self, marker: dict, storage_options: dict | None = None) -> Stream:
        import lance
        import lance_ray

        so = dict((self.storage_options if marker["kind"] == "data" else storage_options) or {}) or None
        ds = lance.dataset(marker["uri"], version=marker["version"], storage_options=so)
        plan = lance_ray.read_lance(marker["uri"], storage_options=so, dataset_options={"version": marker["version"]})
        return Stream(plan, ds.schema.remove_metadata(), num_rows=marker["rows"])

    def write(self, spec: NodeSpec, key: str, stream: Stream) -> tuple[str, int, int]:
        """Execute ``stream`` into a new checkpoint dataset of this node (one
        atomic Lance commit). Returns (uri, version, rows)."""
        from tasks.schema import conform

        uri = self.data_uri(spec, key)
        schema = stream.schema

        def prepare(batch: pa.Table) -> pa.Table:
            return conform(batch, schema)

        ds = stream.ds.map_batches(prepare, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        version, rows = write_lance(ds, uri, schema, self.storage_options)
        return uri, version, rows


# ---------------------------------------------------------------------------
# Parameters shown in the UI, secrets redacted.

_SECRET_NAMES = re.compile(r"(secret|password|passwd|credential|access_key|session_token|api_key|private_key)", re.I)


def redact(value: Any, name: str = "") -> Any:
    if name == "storage_options":
        if isinstance(value, dict) and set(value) == {"block"}:
            return value
        return {k: "***" for k in value} if isinstance(value, dict) else ("***" if value else value)
    if _SECRET_NAMES.search(name) and value not in (None, ""):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    return value


def node_parameters(spec: NodeSpec) -> dict[str, Any]:
    """The node's parameters (explicit and defaults) with secrets redacted."""
    return redact(spec.params.model_dump(mode="json"))


# ---------------------------------------------------------------------------
# Fault injection (tests and failure drills).


def inject_fault(spec: NodeSpec) -> None:
    """``KAIYUAN_FAULT_INJECT="SELECTOR:ACTION:MARKER"``; SELECTOR is a node type
    name or a full node path. ``fail-once``: the first attempt of that node's
    task creates MARKER and raises; later attempts (retries, re-runs) pass.
    ``hang``: create MARKER and sleep until killed (for kill-and-resume)."""
    spec_env = os.environ.get("KAIYUAN_FAULT_INJECT")
    if not spec_env:
        return
    try:
        selector, action, marker = spec_env.split(":", 2)
    except ValueError:
        return
    if selector not in (spec.type_name, spec.path):
        return
    if action == "fail-once":
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        raise RuntimeError(f"{spec.path}: injected fault (KAIYUAN_FAULT_INJECT, first attempt)")
    if action == "hang":
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(1)
