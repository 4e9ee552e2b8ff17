"""Writes in progress on a Lance target, and the sweep of files that an
interrupted write left behind.

A Lance write puts its data files under ``<target>/data/`` and then commits
a manifest naming them; a write killed before its commit leaves files that
no version names. Lance removes such files only when asked to delete
"unverified" files, which would also delete the files of a write still in
progress. So every write holds a lease (a small file under
``<target>/_kaiyuan_writes/``, naming its process and refreshed while it
runs), and the sweep that starts each write deletes only unnamed files older
than every live lease. A lease is live while its process runs (checked on
the same host) or, from another host, while it is refreshed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Mapping

import pyarrow.fs as pafs

from tasks.storage import filesystem_for, lance_exists

log = logging.getLogger("kaiyuan.nodes")

LEASE_DIR = "_kaiyuan_writes"
REFRESH_S = 15.0
# A lease not refreshed for this long belongs to a write that was killed.
STALE_S = 120.0


class WriteLease:
    """Held while a write on ``uri`` runs (a context manager)."""

    def __init__(self, uri: str, storage_options: Mapping[str, str]):
        self._fs, root = filesystem_for(uri, storage_options)
        self._path = f"{root.rstrip('/')}/{LEASE_DIR}/{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _touch(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()), "time": time.time()}
        with self._fs.open_output_stream(self._path) as out:
            out.write(json.dumps(owner).encode())

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                self._touch()
            except OSError as exc:  # a missed refresh is retried; STALE_S spans several
                log.debug("lease refresh failed: %s", exc)

    def __enter__(self) -> "WriteLease":
        try:
            self._fs.create_dir(self._path.rsplit("/", 1)[0], recursive=True)
            self._touch()
        except (OSError, ValueError) as exc:  # a store we cannot write small files to: no sweep
            log.warning("no write lease on %s (%s): files of interrupted writes stay", self._path, exc)
            self.held = False
            return self
        self.held = True
        self._thread = threading.Thread(target=self._refresh, name="kaiyuan-write-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._fs.delete_file(self._path)
        except OSError:
            pass  # swept as stale by a later write


def sweep_orphans(uri: str, storage_options: Mapping[str, str]) -> int:
    """Delete the data files of ``uri`` that no version names and that are
    older than every live write's lease; return how many. Call it while
    holding a lease, before writing."""
    import lance

    fs, root = filesystem_for(uri, storage_options)
    root = root.rstrip("/")
    # Listed first: a write that starts later has a lease, and files, newer than this listing.
    files = [f for f in fs.get_file_info(pafs.FileSelector(f"{root}/data", allow_not_found=True)) if f.is_file]
    if not files:
        return 0
    now = time.time()
    cutoff = now
    for lease in fs.get_file_info(pafs.FileSelector(f"{root}/{LEASE_DIR}", allow_not_found=True)):
        if _live(fs, lease, now):
            cutoff = min(cutoff, lease.mtime.timestamp())
        else:
            try:
                fs.delete_file(lease.path)
            except OSError:
                pass
    candidates = {f.path.rsplit("/", 1)[-1]: f for f in files if f.mtime.timestamp() < cutoff}
    if not candidates:
        return 0
    so = dict(storage_options) or None
    # No committed dataset (the first write was killed): no file is named.
    dataset = lance.dataset(uri, storage_options=so) if lance_exists(uri, storage_options) else None
    versions = [] if dataset is None else sorted((v["version"] for v in dataset.versions()), reverse=True)
    # Newest versions first: most files are named by the latest one.
    for version in versions:
        at = dataset if version == dataset.version else lance.dataset(uri, version=version, storage_options=so)
        for fragment in at.get_fragments():
            for data_file in fragment.data_files():
                candidates.pop(data_file.path.rsplit("/", 1)[-1], None)
        if not candidates:
            return 0
    for info in candidates.values():
        fs.delete_file(info.path)
    log.info("%s: removed %d data file(s) of interrupted writes (%d bytes)", uri, len(candidates),
             sum(f.size or 0 for f in candidates.values()))
    return len(candidates)


def _live(fs, lease: pafs.FileInfo, now: float) -> bool:
    try:
        with fs.open_input_stream(lease.path) as f:
            owner = json.loads(f.read())
    except (OSError, ValueError):
        owner = {}
    if owner.get("host") == socket.gethostname() and owner.get("start") not in (None, "0"):
        return process_start(int(owner["pid"])) == owner["start"]
    return now - lease.mtime.timestamp() <= STALE_S


def process_start(pid: int) -> str:
    """The process's start time in clock ticks ("0" if unknown): a pid reused
    by another process has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"
