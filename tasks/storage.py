"""Paths and object-store options (SPEC §4).

Resolution order for storage options, first match wins: the node's
``storage_options``; the run's ``ray.storage_options``; the JSON in
``LANCE_STORAGE_OPTIONS_JSON``; the AWS_*/MINIO_* environment variables.
A ``{"block": NAME}`` mapping at any level is resolved through a resolver
installed by the flow layer (Prefect blocks live there, not here).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import json
import os
import re
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import pyarrow.fs as pafs

from tasks.base import Redacted

OBJECT_STORE_SCHEMES = ("s3", "gs", "az", "gcs", "abfs", "abfss")

# Installed by the flow layer to turn {"block": "name"} into options.
BLOCK_RESOLVER: Callable[[str], Mapping[str, Any]] | None = None


class StorageConfigError(ValueError):
    pass


def normalize_uri(path: str) -> str:
    """Strip Spark's ``lance.`` / ``lance.`...` `` wrappers; s3a:// -> s3://."""
    path = path.strip()
    if path.startswith("lance.`") and path.endswith("`"):
        path = path[len("lance.`") : -1]
    elif path.startswith("lance."):
        path = path[len("lance.") :]
    path = path.strip("`")
    if path.startswith("s3a://") or path.startswith("s3n://"):
        path = "s3://" + path[6:]
    return path


def is_object_store(path: str) -> bool:
    scheme = urlparse(path).scheme
    return scheme in OBJECT_STORE_SCHEMES


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_storage_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    raw = env.get("LANCE_STORAGE_OPTIONS_JSON")
    if raw:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StorageConfigError(
                f"LANCE_STORAGE_OPTIONS_JSON is not valid JSON ({exc.msg} at position {exc.pos})"
            ) from None
        if not isinstance(value, dict):
            raise StorageConfigError("LANCE_STORAGE_OPTIONS_JSON must be a JSON object")
        return {str(k): str(v) if not isinstance(v, str) else v for k, v in value.items()}

    def first(*names: str) -> str | None:
        for name in names:
            if env.get(name):
                return env[name]
        return None

    opts: dict[str, str] = {}
    allow_http_raw = env.get("LANCE_AWS_ALLOW_HTTP")
    endpoint = first("AWS_ENDPOINT_URL", "MINIO_ENDPOINT")
    if endpoint:
        if "://" not in endpoint:
            if allow_http_raw is not None and not _bool(allow_http_raw):
                endpoint = "https://" + endpoint
            else:
                endpoint = "http://" + endpoint
        opts["aws_endpoint"] = endpoint
    for key, names in (
        ("aws_access_key_id", ("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY")),
        ("aws_secret_access_key", ("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY")),
        ("aws_region", ("AWS_REGION", "MINIO_REGION")),
    ):
        value = first(*names)
        if value:
            opts[key] = value
    if allow_http_raw is not None:
        opts["aws_allow_http"] = "true" if _bool(allow_http_raw) else "false"
    elif endpoint and endpoint.startswith("http://"):
        opts["aws_allow_http"] = "true"
    return opts


def _resolve_level(value: Any) -> dict[str, str] | None:
    if not value:
        return None
    if isinstance(value, Mapping) and set(value) == {"block"}:
        if BLOCK_RESOLVER is None:
            raise StorageConfigError(
                f"storage_options refers to block {value['block']!r} but no block resolver is available"
            )
        return {str(k): str(v) for k, v in BLOCK_RESOLVER(str(value["block"])).items()}
    return {str(k): str(v) if not isinstance(v, str) else v for k, v in dict(value).items()}


def resolve_storage_options(
    node_options: Mapping[str, Any] | None,
    run_options: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
) -> Redacted:
    for level in (node_options, run_options):
        resolved = _resolve_level(level)
        if resolved:
            return Redacted(resolved)
    return Redacted(env_storage_options(environ))


def filesystem_for(path: str, storage_options: Mapping[str, str]):
    """A pyarrow filesystem and the path inside it (for globbing/existence)."""
    if not is_object_store(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    parsed = urlparse(path)
    if parsed.scheme == "s3":
        kwargs: dict[str, Any] = {}
        so = storage_options
        if so.get("aws_access_key_id"):
            kwargs["access_key"] = so["aws_access_key_id"]
            kwargs["secret_key"] = so.get("aws_secret_access_key")
        if so.get("aws_region"):
            kwargs["region"] = so["aws_region"]
        endpoint = so.get("aws_endpoint") or so.get("endpoint")
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        return pafs.S3FileSystem(**kwargs), parsed.netloc + parsed.path
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner


def _with_scheme(original: str, inner: str) -> str:
    parsed = urlparse(original)
    if parsed.scheme in OBJECT_STORE_SCHEMES:
        return f"{parsed.scheme}://{inner}"
    return inner


_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_paths(paths: list[str], storage_options: Mapping[str, str]) -> list[str]:
    """Expand globs; return concrete paths (sorted per pattern for determinism).
    A pattern matching nothing raises FileNotFoundError naming it."""
    out: list[str] = []
    for path in paths:
        if not _GLOB_CHARS.search(path):
            out.append(path)
            continue
        if not is_object_store(path):
            matches = sorted(globlib.glob(path))
        else:
            fs, inner = filesystem_for(path, storage_options)
            base = inner
            while _GLOB_CHARS.search(base):
                base = base.rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            matches = sorted(
                _with_scheme(path, i.path) for i in infos if fnmatch.fnmatch(i.path, inner)
            )
        if not matches:
            raise FileNotFoundError(f"no path matches {path!r}")
        out.extend(matches)
    return out


def is_directory(path: str, storage_options: Mapping[str, str]) -> bool:
    if not is_object_store(path):
        return os.path.isdir(path)
    fs, inner = filesystem_for(path, storage_options)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def files_under(path: str, storage_options: Mapping[str, str], suffix: str) -> list[str]:
    """The files a directory reader reads: recursively, names ending in
    ``suffix`` (any case), skipping hidden entries (``.crc``, ``_SUCCESS``,
    ``_temporary/``) as Spark and Arrow do; sorted, with the path's scheme."""
    fs, inner = filesystem_for(path, storage_options)
    base = inner.rstrip("/")
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = info.path[len(base):].lstrip("/")
        if info.type != pafs.FileType.File or not info.path.lower().endswith(suffix):
            continue
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        out.append(_with_scheme(path, info.path))
    return sorted(out)


def relative_files(path: str, storage_options: Mapping[str, str]) -> set[str]:
    """Every file under a directory, relative to it (one recursive listing);
    empty if the directory is absent."""
    fs, inner = filesystem_for(path, storage_options)
    base = inner.rstrip("/")
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return {i.path[len(base):].lstrip("/") for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}


def file_size(path: str, storage_options: Mapping[str, str]) -> int | None:
    if not is_object_store(path):
        return os.path.getsize(path) if os.path.isfile(path) else None
    fs, inner = filesystem_for(path, storage_options)
    return fs.get_file_info(inner).size


def path_exists(path: str, storage_options: Mapping[str, str]) -> bool:
    if not is_object_store(path):
        return os.path.exists(path)
    fs, inner = filesystem_for(path, storage_options)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def lance_exists(uri: str, storage_options: Mapping[str, str]) -> bool:
    """True if a Lance dataset is committed at ``uri``."""
    import lance

    if not is_object_store(uri) and not os.path.isdir(uri):
        return False
    try:
        lance.dataset(uri, storage_options=dict(storage_options) or None)
        return True
    except (ValueError, FileNotFoundError, OSError) as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower() or isinstance(
            exc, FileNotFoundError
        ):
            return False
        raise
