"""Checkpoints: Lance datasets published by a marker, verified before reuse.

One mechanism serves the flow's node checkpoints (flows/checkpoint.py) and
MinHash's signatures (tasks/minhash.py):

* the data is written as a Lance dataset under the checkpoint's directory,
  under a name no other run uses (``private_uri``), so concurrent runs never
  share a half-written dataset;
* the dataset is verified (``lance_problem``: every data file present at the
  size its manifest records, the expected row count) and only then named in
  a small JSON marker: the dataset's URI (or its name next to the marker),
  its version and rows. The marker is written last and atomically (a
  temporary file and ``os.replace`` locally, one PUT on an object store), so
  a run killed before it leaves no marker;
* a lookup reads the marker and verifies its dataset again: a dataset that
  changed since (another version committed) or lost files is not reused. The
  marker is then discarded with a warning, and the dataset deleted when the
  checkpoint owns it and it is provably broken (a transient read error
  deletes nothing).

Nothing here imports Prefect; Ray only where a dataset is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from typing import Any

import pyarrow as pa

log = logging.getLogger("kaiyuan.checkpoints")


def lance_problem(uri: str, version: int, rows: int | None, storage_options: dict | None) -> str | None:
    """What is wrong with the Lance dataset ``uri`` at ``version``, or None
    when it is complete: every data file of every fragment present, at the
    size the manifest records, and ``rows`` rows (unless None). Opening a
    dataset reads only its manifest, so a lost data file shows only here, or
    mid-run."""
    import lance
    import pyarrow.fs as pafs

    from tasks.storage import filesystem_for

    fs, inner = filesystem_for(uri, storage_options or {})
    data = inner.rstrip("/") + "/data"
    listed = fs.get_file_info(pafs.FileSelector(data, recursive=True, allow_not_found=True))
    sizes = {f.path[len(data) + 1 :]: f.size for f in listed if f.type == pafs.FileType.File}
    ds = lance.dataset(uri, version=version, storage_options=storage_options or None)
    for frag in ds.get_fragments():
        for df in frag.data_files():
            size = sizes.get(str(df.path))
            if size is None:
                return f"data file {df.path} of fragment {frag.fragment_id} is missing"
            if df.file_size_bytes and size != df.file_size_bytes:
                return f"data file {df.path} has {size} bytes, its manifest says {df.file_size_bytes}"
    if rows is None:
        return None
    n = ds.count_rows()
    return None if n == rows else f"it holds {n} rows, expected {rows}"


def write_lance(ds, uri: str, schema: pa.Schema, storage_options: dict | None) -> tuple[int, int]:
    """Execute the Ray dataset ``ds`` into a new Lance dataset at ``uri`` (one
    commit, fragments written in parallel). Returns (version, rows)."""
    import lance

    from tasks.storage import is_object_store
    from tasks.writers import _make_datasink_class

    if not is_object_store(uri):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
    sink = _make_datasink_class()(uri, schema=schema, mode="overwrite", storage_options=storage_options or None)
    ds.write_datasink(sink)
    dataset = lance.dataset(uri, storage_options=storage_options or None)
    return dataset.version, dataset.count_rows()


def _fs(path: str, storage_options: dict | None):
    from tasks.storage import filesystem_for

    return filesystem_for(path, storage_options or {})


def read_marker(path: str, storage_options: dict | None) -> dict | None:
    """The marker at ``path``, None when there is none (raises when it
    cannot be read or parsed)."""
    import pyarrow.fs as pafs

    fs, inner = _fs(path, storage_options)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(inner) as f:
        return json.loads(f.read().decode())


def write_marker(path: str, marker: dict, storage_options: dict | None) -> None:
    """Write ``marker`` at ``path`` atomically: readers see the old marker or
    the new one, never part of one."""
    from tasks.storage import is_object_store

    body = json.dumps(marker, indent=1, sort_keys=True, default=str).encode()
    if is_object_store(path):  # an object appears whole or not at all
        fs, inner = _fs(path, storage_options)
        with fs.open_output_stream(inner) as f:
            f.write(body)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # per run: concurrent runs never share one
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_path(path: str, storage_options: dict | None, who: str, logger: logging.Logger = log) -> None:
    """Delete a dataset directory or a marker, best effort: leftovers cost
    disk, not correctness."""
    import pyarrow.fs as pafs

    fs, inner = _fs(path, storage_options)
    try:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(inner)
        elif info.type == pafs.FileType.File:
            fs.delete_file(inner)
    except Exception as exc:
        logger.warning("%s: could not remove %s: %s", who, path, exc)


@dataclasses.dataclass
class Unusable(Exception):
    """A published checkpoint that must not be reused. ``provable``: its
    dataset is known to be broken (not merely unreadable just now)."""

    uri: str
    problem: str
    provable: bool


class Incomplete(Exception):
    """The dataset a run wrote for a checkpoint failed verification."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"{uri} is incomplete: {problem}")
        self.uri, self.problem = uri, problem


class Checkpoint:
    """One marker (``marker_path``) and the datasets it may name.

    ``storage_options`` are for the marker and the datasets the checkpoint
    owns (those under its directory, written at ``private_uri``); a marker
    may also name a dataset the checkpoint does not own (a writer's output),
    verified with the options given to ``lookup`` and never deleted.
    """

    def __init__(self, marker_path: str, storage_options: dict | None, node_path: str, label: str = "checkpoint", logger: logging.Logger = log):
        self.marker_path = marker_path
        self.base = marker_path.rsplit("/", 1)[0]
        self.storage_options = dict(storage_options or {})
        self.node_path, self.label, self.log = node_path, label, logger

    def private_uri(self, stem: str) -> str:
        """A new dataset URI under the checkpoint's directory, for one run."""
        return f"{self.base}/{stem}-{uuid.uuid4().hex}.lance"

    def dataset_uri(self, marker: dict) -> str:
        """The dataset a marker names: ``uri``, or ``dataset`` next to the marker."""
        return marker["uri"] if "uri" in marker else f"{self.base}/{marker['dataset']}"

    def owns(self, uri: str) -> bool:
        return uri.startswith(self.base + "/")

    def options_for(self, uri: str, storage_options: dict | None = None) -> dict:
        """Storage options for a dataset: the checkpoint's for its own, else
        ``storage_options`` (the node's)."""
        return self.storage_options if self.owns(uri) else dict(storage_options or {})

    # -- reuse ------------------------------------------------------------
    def lookup(self, rows: int | None = None, storage_options: dict | None = None) -> dict | None:
        """The marker when its dataset is still as published (holding
        ``rows`` rows when given, else the marker's), else None. A failed
        checkpoint is logged and its dataset deleted when provably broken and
        owned; the next ``publish`` replaces its marker."""
        try:
            return self.published(rows, storage_options)
        except Unusable as bad:
            self.log.warning("%s: %s %s discarded (%s); recomputing it", self.node_path, self.label, bad.uri, bad.problem)
            if bad.provable and self.owns(bad.uri):
                remove_path(bad.uri, self.storage_options, self.node_path, self.log)
            return None

    def published(self, rows: int | None = None, storage_options: dict | None = None) -> dict | None:
        """The verified marker; None when nothing is published; raises
        ``Unusable`` when what is published must not be reused."""
        uri = self.marker_path
        try:
            marker = read_marker(self.marker_path, self.storage_options)
            if marker is None:
                return None
            uri = self.dataset_uri(marker)
            problem = self._verify(marker, uri, rows, storage_options)
        except Exception as exc:  # a checkpoint only saves time: recompute rather than fail
            raise Unusable(uri, f"unreadable ({type(exc).__name__}: {exc})", provable=False) from None
        if problem:
            raise Unusable(uri, problem, provable=True)
        return marker

    def _verify(self, marker: dict, uri: str, rows: int | None, storage_options: dict | None) -> str | None:
        import lance

        so = self.options_for(uri, storage_options)
        version = int(marker["version"])
        latest = lance.dataset(uri, storage_options=so or None).version
        if latest != version:  # changed since (another run, a user)
            return f"it is at version {latest} now, the checkpoint recorded version {version}"
        return lance_problem(uri, version, rows if rows is not None else marker.get("rows"), so)

    # -- publishing -------------------------------------------------------
    def publish(
        self,
        uri: str,
        rows: int | None,
        meta: dict[str, Any],
        *,
        version: int | None = None,
        storage_options: dict | None = None,
        prefer_published: bool = False,
    ) -> dict:
        """Verify the dataset at ``uri`` (``version``, else its latest) and
        write the marker naming it; returns the marker. Raises ``Incomplete``
        when the dataset fails verification. With ``prefer_published``, a
        complete checkpoint another run published meanwhile is kept (and
        returned) and this run's dataset deleted."""
        import lance

        so = self.options_for(uri, storage_options)
        try:
            if version is None:
                version = lance.dataset(uri, storage_options=so or None).version
            problem = lance_problem(uri, version, rows, so)
        except Exception as exc:
            raise Incomplete(uri, f"it cannot be verified ({type(exc).__name__}: {exc})") from None
        if problem:
            raise Incomplete(uri, problem)
        if prefer_published:
            theirs = self._complete_or_none(rows, storage_options)
            if theirs is not None:
                if self.owns(uri):
                    remove_path(uri, self.storage_options, self.node_path, self.log)
                return theirs
        where = {"uri": uri} if "uri" in meta or not self.owns(uri) else {"dataset": uri[len(self.base) + 1 :]}
        marker = {**meta, **where, "version": version, "rows": rows}
        write_marker(self.marker_path, marker, self.storage_options)
        return marker

    def _complete_or_none(self, rows: int | None, storage_options: dict | None) -> dict | None:
        try:
            return self.published(rows, storage_options)
        except Unusable:
            return None
