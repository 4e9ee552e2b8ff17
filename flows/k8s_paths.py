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


__all__ = ["DEFAULT_BUCKET", "data_bucket", "rewrite_path", "rewrite_config", "upload"]


def upload(local_dirs: list[str], *, create_bucket: bool = False, environ: Mapping[str, str] | None = None) -> list[str]:
    """Copy local ``data/sample``/``data/models``/``data/output`` trees to
    where the k8s-mode rewrite expects them (``s3://BUCKET/sample/…``), with
    the SPEC §4 storage options from the environment. Returns the target URIs."""
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
        pafs.copy_files(os.path.abspath(local), inner, destination_filesystem=fs, use_threads=True)
        targets.append(target)
    return targets


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
    for local, target in zip(args.dirs, upload(args.dirs, create_bucket=args.create_bucket)):
        print(f"uploaded {local} -> {target}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
