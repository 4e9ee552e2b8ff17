"""SPEC §2: in k8s mode, local sample/output/model paths become object-store URIs.

``data/sample/…`` becomes ``s3://BUCKET/sample/…`` (likewise ``data/output/``
and ``data/models/``), so that the same YAML runs on a cluster whose pods
share nothing but the object store. The rewrite is applied once, to the
validated config, when the flow runs with ``mode="k8s"``.

BUCKET comes from ``K8S_DATA_BUCKET``, else ``MINIO_BUCKET``, else
``kaiyuan-ray``. ``K8S_DATA_SCHEME`` (default ``s3``) picks another scheme
(``gs``, ``az``) for clusters on other clouds.

Every string parameter of every node is considered (``input_path`` and its
lists, ``output_path``, ``train_file``/``val_file``, ``model_path``,
``tokenizer_name_or_path``, …), so nodes added later need no change here.
Paths that are already URIs, absolute, or outside those three folders are
left alone.

Copying local data to where this rewrite points is ``deployments.upload``.
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


def data_scheme(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("K8S_DATA_SCHEME") or "s3"


def rewrite_path(path: str, bucket: str | None = None, scheme: str | None = None) -> str:
    """``data/sample/x.lance`` -> ``s3://BUCKET/sample/x.lance``; anything else unchanged.

    Spark's ``lance.`` wrappers and a leading ``./`` are tolerated."""
    if not isinstance(path, str):
        return path
    bucket = bucket or data_bucket()
    scheme = scheme or data_scheme()
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
    scheme = data_scheme(env)
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


__all__ = ["DEFAULT_BUCKET", "data_bucket", "data_scheme", "rewrite_config", "rewrite_path"]
