"""SPEC §2: in k8s mode, local sample/output/model paths become object-store URIs.

The old CLI rewrote ``data/sample/…`` to ``s3a://BUCKET/sample/…`` (likewise
``data/output/`` and ``data/models/``) so that the same YAML ran on a
cluster whose pods share nothing but the object store. Here the rewrite is
applied once, to the validated config, when the flow runs with
``mode="k8s"``; ``s3a://`` is normalised to ``s3://`` (SPEC §4), so the
rewritten URIs are ``s3://BUCKET/…`` directly.

BUCKET comes from ``K8S_DATA_BUCKET``, else ``MINIO_BUCKET``, else
``kaiyuan-ray``. ``K8S_DATA_SCHEME`` (default ``s3``) picks another scheme
(``gs``, ``az``) for clusters on other clouds.

Every string parameter of every node is considered (``input_path`` and its
lists, ``output_path``, ``train_file``/``val_file``, ``model_path``,
``tokenizer_name_or_path``, …), so nodes added later need no change here.
Paths that are already URIs, absolute, or outside those three folders are
left alone.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

DEFAULT_BUCKET = "kaiyuan-ray"
# local prefix -> key prefix inside the bucket
PREFIXES = (("data/sample/", "sample/"), ("data/output/", "output/"), ("data/models/", "models/"))


def data_bucket(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("K8S_DATA_BUCKET") or env.get("MINIO_BUCKET") or DEFAULT_BUCKET


def rewrite_path(path: str, bucket: str | None = None, scheme: str | None = None) -> str:
    """``data/sample/x.lance`` -> ``s3://BUCKET/sample/x.lance``; anything else unchanged.

    Spark's ``lance.`` wrappers and a leading ``./`` are tolerated."""
    if not isinstance(path, str):
        return path
    bucket = bucket or data_bucket()
    scheme = scheme or os.environ.get("K8S_DATA_SCHEME") or "s3"
    inner = path.strip()
    if inner.startswith("lance.`") and inner.endswith("`"):
        inner = inner[len("lance.`") : -1]
    elif inner.startswith("lance."):
        inner = inner[len("lance.") :]
    while inner.startswith("./"):
        inner = inner[2:]
    for local, key in PREFIXES:
        if inner.startswith(local):
            return f"{scheme}://{bucket}/{key}{inner[len(local):]}"
        if inner == local.rstrip("/"):
            return f"{scheme}://{bucket}/{key.rstrip('/')}"
    return path


def _rewrite_value(value: Any, bucket: str, scheme: str) -> Any:
    if isinstance(value, str):
        return rewrite_path(value, bucket, scheme)
    if isinstance(value, list):
        return [_rewrite_value(v, bucket, scheme) for v in value]
    return value


def rewrite_config(cfg, environ: Mapping[str, str] | None = None):
    """Rewrite the local data paths of every node of a loaded ``PipelineConfig``
    in place (and return it). Only string and list-of-string parameters change;
    ``storage_options`` are never touched."""
    env = os.environ if environ is None else environ
    bucket = data_bucket(env)
    scheme = env.get("K8S_DATA_SCHEME") or "s3"
    for spec in cfg.nodes():
        params = spec.params
        updates = {}
        for name in type(params).model_fields:
            if name == "storage_options":
                continue
            value = getattr(params, name)
            new = _rewrite_value(value, bucket, scheme)
            if new != value:
                updates[name] = new
        if updates:
            spec.params = params.model_copy(update=updates)
    return cfg


__all__ = ["DEFAULT_BUCKET", "UploadError", "copy_tree", "data_bucket", "rewrite_path", "rewrite_config", "upload"]


def upload(local_dirs: list[str], *, create_bucket: bool = False, environ: Mapping[str, str] | None = None) -> list[str]:
    """Copy local ``data/sample``/``data/models``/``data/output`` trees to
    where the k8s-mode rewrite expects them (``s3://BUCKET/sample/…``), with
    the SPEC §4 storage options from the environment. Returns the target URIs.

    Raises ``UploadError`` if any object fails to upload or lands with the
    wrong size."""
    import pyarrow.fs as pafs

    from tasks.storage import env_storage_options, filesystem_for

    env = os.environ if environ is None else environ
    options = env_storage_options(env)
    targets = []
    for local in local_dirs:
        rel = os.path.relpath(os.path.abspath(local), os.getcwd()).replace(os.sep, "/").rstrip("/") + "/"
        target = rewrite_path(rel, data_bucket(env), env.get("K8S_DATA_SCHEME") or "s3").rstrip("/")
        if target == rel.rstrip("/"):
            raise ValueError(f"{local!r} is not under data/sample, data/models or data/output")
        fs, inner = filesystem_for(target, options)
        bucket = inner.split("/", 1)[0]
        if create_bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            creator = pafs.S3FileSystem(**_s3_kwargs(options), allow_bucket_creation=True) if isinstance(fs, pafs.S3FileSystem) else fs
            creator.create_dir(bucket)
        copy_tree(os.path.abspath(local), fs, inner)
        targets.append(target)
    return targets


class UploadError(RuntimeError):
    pass


def copy_tree(local_root: str, fs, dest_root: str, threads: int = 8) -> int:
    """Copy every file under ``local_root`` to ``dest_root`` on ``fs``; return
    the number of files.

    Not ``pyarrow.fs.copy_files``: it closes its output streams in a
    destructor that only logs errors ("Error ignored when destroying file"),
    so an object store that refuses a PUT (a full SeaweedFS, a quota) made
    the copy look successful. Here every stream is closed explicitly, and
    every object's size is read back."""
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for dirpath, _dirs, names in os.walk(local_root):
        for name in names:
            path = os.path.join(dirpath, name)
            files.append((path, dest_root.rstrip("/") + "/" + os.path.relpath(path, local_root).replace(os.sep, "/")))

    import pyarrow.fs as pafs

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


def _s3_kwargs(options: Mapping[str, str]) -> dict:
    from urllib.parse import urlparse

    kwargs: dict = {}
    if options.get("aws_access_key_id"):
        kwargs["access_key"] = options["aws_access_key_id"]
        kwargs["secret_key"] = options.get("aws_secret_access_key")
    if options.get("aws_region"):
        kwargs["region"] = options["aws_region"]
    if options.get("aws_endpoint"):
        ep = urlparse(options["aws_endpoint"])
        kwargs["endpoint_override"] = ep.netloc or ep.path
        kwargs["scheme"] = ep.scheme or "https"
    return kwargs


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.k8s_paths upload data/sample data/models`` (what
    ``make k8s-prepare`` runs) and ``python -m flows.k8s_paths show PATH...``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m flows.k8s_paths", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="copy local data/{sample,models,output} trees to s3://BUCKET/...")
    up.add_argument("dirs", nargs="+")
    up.add_argument("--create-bucket", action="store_true", help="create the bucket if missing (the cluster's bucket-init Job normally does)")
    show = sub.add_parser("show", help="print what k8s mode rewrites PATH to")
    show.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "show":
        for path in args.paths:
            print(f"{path} -> {rewrite_path(path)}")
        return 0
    try:
        targets = upload(args.dirs, create_bucket=args.create_bucket)
    except (UploadError, ValueError, OSError) as exc:
        print(f"upload failed: {exc}", file=sys.stderr)
        return 1
    for local, target in zip(args.dirs, targets):
        print(f"uploaded {local} -> {target}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
