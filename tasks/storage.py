"""Paths and object-store options (SPEC §4).

Resolution order for storage options, first match wins: the node's
``storage_options``; the run's ``ray.storage_options``; the JSON in
``LANCE_STORAGE_OPTIONS_JSON``; the AWS_*/MINIO_* environment variables.
A ``{"block": NAME}`` mapping at any level is resolved through a resolver
installed by the flow layer (Prefect blocks live there, not here); what it
returns is kept for ``KAIYUAN_CREDENTIALS_TTL_S`` seconds (default 300), so a
long-lived Ray worker picks up rotated credentials.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import json
import os
import re
import threading
import time
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
        ("aws_session_token", ("AWS_SESSION_TOKEN",)),  # temporary credentials
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


CREDENTIALS_TTL_ENV = "KAIYUAN_CREDENTIALS_TTL_S"
DEFAULT_CREDENTIALS_TTL_S = 300.0

# (resolver, block name) -> (time resolved, options or the error message).
# Lives as long as the process, a Ray worker included, hence the expiry.
_BLOCK_CACHE: dict[tuple[Callable, str], tuple[float, dict[str, str] | str]] = {}
_BLOCK_CACHE_LOCK = threading.Lock()
_clock = time.monotonic  # a module attribute so tests can advance it


def credentials_ttl() -> float:
    """Seconds a resolved block stays cached (``KAIYUAN_CREDENTIALS_TTL_S``;
    0 resolves on every use)."""
    raw = os.environ.get(CREDENTIALS_TTL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_CREDENTIALS_TTL_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise StorageConfigError(f"{CREDENTIALS_TTL_ENV} must be a number of seconds, not {raw!r}") from None


def block_options(name: str) -> dict[str, str]:
    """The storage options of block ``name``, through ``BLOCK_RESOLVER``.
    Cached for ``credentials_ttl()`` seconds, failures included (one API
    lookup per name per TTL, however many nodes name it)."""
    resolver = BLOCK_RESOLVER
    if resolver is None:
        raise StorageConfigError(f"storage_options refers to block {name!r} but no block resolver is available")
    key, now = (resolver, name), _clock()
    with _BLOCK_CACHE_LOCK:
        hit = _BLOCK_CACHE.get(key)
    if hit is None or now - hit[0] >= credentials_ttl():
        try:
            found: dict[str, str] | str = {str(k): str(v) for k, v in resolver(name).items()}
        except StorageConfigError as exc:
            found = str(exc)
        hit = (now, found)
        with _BLOCK_CACHE_LOCK:
            _BLOCK_CACHE[key] = hit
    if isinstance(hit[1], str):
        raise StorageConfigError(hit[1])
    return dict(hit[1])


def _resolve_level(value: Any) -> dict[str, str] | None:
    if not value:
        return None
    if isinstance(value, Mapping) and set(value) == {"block"}:
        return block_options(str(value["block"]))
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


# Lance (object_store) spellings of each S3 option, first match wins.
_S3_ALIASES = {
    "access_key": ("aws_access_key_id", "access_key_id"),
    "secret_key": ("aws_secret_access_key", "secret_access_key"),
    "session_token": ("aws_session_token", "aws_token", "session_token", "token"),
    "region": ("aws_region", "region", "aws_default_region", "default_region"),
    "endpoint": ("aws_endpoint", "aws_endpoint_url", "endpoint", "endpoint_url"),
    "allow_http": ("aws_allow_http", "allow_http"),
}


def _s3_option(options: Mapping[str, str], field: str) -> str | None:
    lowered = {str(k).lower(): v for k, v in options.items()}
    for name in _S3_ALIASES[field]:
        if lowered.get(name):
            return str(lowered[name])
    return None


def s3_filesystem_kwargs(storage_options: Mapping[str, str]) -> dict[str, Any]:
    """``pyarrow.fs.S3FileSystem`` arguments for Lance storage options: keys,
    session token (temporary credentials), region and endpoint."""
    kwargs: dict[str, Any] = {}
    access_key = _s3_option(storage_options, "access_key")
    if access_key:
        kwargs["access_key"] = access_key
        kwargs["secret_key"] = _s3_option(storage_options, "secret_key")
        token = _s3_option(storage_options, "session_token")
        if token:
            kwargs["session_token"] = token
    region = _s3_option(storage_options, "region")
    if region:
        kwargs["region"] = region
    endpoint = _s3_option(storage_options, "endpoint")
    if endpoint:
        if "://" not in endpoint:  # SPEC §4: http unless allow-http is false
            allow_http = _s3_option(storage_options, "allow_http")
            insecure = allow_http is None or _bool(allow_http)
            endpoint = ("http://" if insecure else "https://") + endpoint
        ep = urlparse(endpoint)
        kwargs["endpoint_override"] = ep.netloc
        kwargs["scheme"] = ep.scheme
    return kwargs


def filesystem_for(path: str, storage_options: Mapping[str, str]):
    """A pyarrow filesystem and the path inside it (for globbing/existence).
    Every object-store filesystem the project builds comes from here."""
    if not is_object_store(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, _, inner = path.partition("://")  # not urlparse: '?' and '#' are glob/name characters here
    if scheme == "s3":
        return pafs.S3FileSystem(**s3_filesystem_kwargs(storage_options)), inner
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner


def _with_scheme(original: str, inner: str) -> str:
    parsed = urlparse(original)
    if parsed.scheme in OBJECT_STORE_SCHEMES:
        return f"{parsed.scheme}://{inner}"
    return inner


_GLOB_CHARS = re.compile(r"[*?\[]")


def _list_level(fs, prefix: str, dirs_only: bool) -> list[pafs.FileInfo]:
    """One level under ``prefix`` (a delimiter listing on an object store)."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
    if dirs_only:
        return [i for i in infos if i.type == pafs.FileType.Directory]
    return infos


def _match_segment(name: str, pattern: str) -> bool:
    """``glob.glob``'s rule for one name: a name starting with '.' matches
    only a pattern starting with '.'; ``*`` never crosses '/' (names have none)."""
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def glob_object_store(fs, pattern: str) -> list[str]:
    """``glob.glob(pattern)`` (recursive=False) on an object store, ``pattern``
    being ``bucket/key...``: matched segment by segment, listing one level
    only where a segment has wildcards, so ``*`` and ``**`` stay within one
    segment and hidden names are skipped as on a local disk. Unsorted."""
    want_dirs = pattern.endswith("/")  # glob: "a/*/" means directories, with the slash
    segments = [s for s in pattern.split("/") if s]
    # (path, its type when a listing showed it; None when not looked up yet)
    current: list[tuple[str, pafs.FileType | None]] = [("", pafs.FileType.Directory)]
    for i, segment in enumerate(segments):
        if not _GLOB_CHARS.search(segment):
            current = [(f"{p}/{segment}" if p else segment, None) for p, _ in current]
            continue
        dirs_only = want_dirs or i < len(segments) - 1
        current = [
            (info.path.rstrip("/"), info.type)
            for prefix, _ in current
            for info in _list_level(fs, prefix, dirs_only)
            if _match_segment(info.base_name, segment)
        ]
    unknown = [p for p, kind in current if kind is None]
    looked_up = {i.path.rstrip("/"): i.type for i in fs.get_file_info(unknown)} if unknown else {}
    wanted = (pafs.FileType.Directory,) if want_dirs else (pafs.FileType.File, pafs.FileType.Directory)
    suffix = "/" if want_dirs else ""
    return [p + suffix for p, kind in current if (kind or looked_up.get(p)) in wanted]


def expand_paths(paths: list[str], storage_options: Mapping[str, str]) -> list[str]:
    """Expand globs; return concrete paths (sorted per pattern for determinism).
    A pattern matches on an object store what it matches on a local disk with
    ``glob.glob``. A pattern matching nothing raises FileNotFoundError naming it."""
    out: list[str] = []
    for path in paths:
        if not _GLOB_CHARS.search(path):
            out.append(path)
            continue
        if not is_object_store(path):
            matches = sorted(globlib.glob(path))
        else:
            fs, inner = filesystem_for(path, storage_options)
            matches = sorted(_with_scheme(path, m) for m in glob_object_store(fs, inner))
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
