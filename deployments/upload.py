"""Copy local data to where k8s mode reads it (what ``make k8s-prepare`` runs).

    python -m deployments.upload data/sample data/models   # -> s3://BUCKET/sample/, s3://BUCKET/models/
    python -m deployments.upload --show data/sample/x.lance  # print the k8s-mode URI only

Targets come from the flow's own k8s path rewrite (``flows.k8s_paths``:
``K8S_DATA_BUCKET``, ``K8S_DATA_SCHEME``); credentials and endpoint from the
same environment variables as every node's storage options
(``tasks.storage.env_storage_options``: ``AWS_*``/``MINIO_*``,
``LANCE_STORAGE_OPTIONS_JSON``), and the filesystem from
``tasks.storage.filesystem_for``, so an upload reaches exactly the store a
run reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import pyarrow.fs as pafs

from flows.k8s_paths import data_bucket, data_scheme, rewrite_path
from tasks.storage import env_storage_options, filesystem_for

__all__ = ["UploadError", "copy_tree", "main", "upload"]


class UploadError(RuntimeError):
    pass


def upload(local_dirs: list[str], *, create_bucket: bool = False, environ: Mapping[str, str] | None = None) -> list[str]:
    """Copy local ``data/sample``/``data/models``/``data/output`` trees to
    where the k8s-mode rewrite expects them (``s3://BUCKET/sample/…``).
    Returns the target URIs.

    Raises ``ValueError`` for a directory outside those folders, and
    ``UploadError`` if any object fails to upload or lands with the wrong size."""
    env = os.environ if environ is None else environ
    options = env_storage_options(env)
    targets = []
    for local in local_dirs:
        rel = os.path.relpath(os.path.abspath(local), os.getcwd()).replace(os.sep, "/").rstrip("/") + "/"
        target = rewrite_path(rel, data_bucket(env), data_scheme(env)).rstrip("/")
        if target == rel.rstrip("/"):
            raise ValueError(f"{local!r} is not under data/sample, data/models or data/output")
        fs, inner = filesystem_for(target, options)
        bucket = inner.split("/", 1)[0]
        if create_bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            _bucket_creator(fs).create_dir(bucket)
        copy_tree(os.path.abspath(local), fs, inner)
        targets.append(target)
    return targets


def _bucket_creator(fs):
    """The same filesystem, allowed to create buckets (S3 refuses otherwise).
    Rebuilt from its pickled settings, so endpoint and credentials stay those
    ``filesystem_for`` chose."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    rebuild, (settings,) = fs.__reduce__()
    return rebuild({**settings, "allow_bucket_creation": True})


def copy_tree(local_root: str, fs, dest_root: str, threads: int = 8) -> int:
    """Copy every file under ``local_root`` to ``dest_root`` on ``fs``; return
    the number of files.

    Not ``pyarrow.fs.copy_files``: it closes its output streams in a
    destructor that only logs errors ("Error ignored when destroying file"),
    so an object store that refuses a PUT (a full SeaweedFS, a quota) made
    the copy look successful. Here every stream is closed explicitly, and
    every object's size is read back."""
    files = []
    for dirpath, _dirs, names in os.walk(local_root):
        for name in names:
            path = os.path.join(dirpath, name)
            files.append((path, dest_root.rstrip("/") + "/" + os.path.relpath(path, local_root).replace(os.sep, "/")))

    if isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories to make
        for parent in sorted({dest.rsplit("/", 1)[0] for _src, dest in files}):
            fs.create_dir(parent, recursive=True)

    def put(job: tuple[str, str]) -> None:
        src, dest = job
        try:
            with open(src, "rb") as f, fs.open_output_stream(dest) as out:
                while chunk := f.read(8 << 20):
                    out.write(chunk)
        except Exception as exc:
            raise UploadError(f"uploading {src} to {dest}: {exc}") from exc

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(put, files))  # re-raises the first failure
    if files:
        infos = fs.get_file_info([dest for _src, dest in files])
        wrong = [(src, info) for (src, _dest), info in zip(files, infos) if info.size != os.path.getsize(src)]
        if wrong:
            src, info = wrong[0]
            raise UploadError(
                f"{len(wrong)} of {len(files)} uploaded objects have the wrong size, e.g. {info.path}: "
                f"{info.size} bytes on the store, {os.path.getsize(src)} locally"
            )
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.upload",
        description="Copy local data/{sample,models,output} trees to s3://BUCKET/... (where k8s mode reads them).",
    )
    parser.add_argument("paths", nargs="+", help="directories under data/sample, data/models or data/output")
    parser.add_argument("--show", action="store_true", help="only print what k8s mode rewrites each PATH to")
    parser.add_argument(
        "--create-bucket", action="store_true", help="create the bucket if missing (the cluster's bucket-init Job normally does)"
    )
    args = parser.parse_args(argv)
    if args.show:
        for path in args.paths:
            print(f"{path} -> {rewrite_path(path)}")
        return 0
    try:
        targets = upload(args.paths, create_bucket=args.create_bucket)
    except (UploadError, ValueError, OSError) as exc:
        print(f"upload failed: {exc}", file=sys.stderr)
        return 1
    for local, target in zip(args.paths, targets):
        print(f"uploaded {local} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
