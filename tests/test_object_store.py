"""Object-store credentials and globs against a real S3 server (SeaweedFS,
tests/s3_server.py; moto's server as the fallback):

- a glob matches on S3 exactly what it matches on a local disk (same tree,
  same patterns, compared with ``glob.glob``);
- a session token reaches every filesystem the project builds (storage
  options under each Lance spelling, the AWS_* environment, a LanceStorage
  block), and a wrong one makes a real read fail;
- block credentials cached in a process (a Ray worker) expire: a block
  rotated in a real Prefect API is used once the TTL has passed.
"""

from __future__ import annotations

import glob
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from pydantic import SecretStr

from tasks import storage
from tasks.storage import expand_paths, filesystem_for, resolve_storage_options
from tests.s3_server import make_bucket, s3_server

pytestmark = pytest.mark.xdist_group("object-store")

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "globs"
TOKEN = "kaiyuan-session-token-" + uuid.uuid4().hex

# Nested dirs, hidden files and dirs, several extensions, a directory whose
# name looks like a file, names differing by one character.
TREE = [
    "top.jsonl",
    ".top_hidden.jsonl",
    "readme.txt",
    "a/x1.jsonl",
    "a/x2.parquet",
    "a/.hidden.jsonl",
    "a/.hidden_dir/z.jsonl",
    "a/b/x1.parquet",
    "a/b/xy.parquet",
    "a/b/x10.parquet",
    "a/b/deep/x3.parquet",
    "a/c/y.jsonl",
    "a/c/xz.parquet",
    "a/e.jsonl/part-0.jsonl",
    "b/q.jsonl",
    "b/r.csv",
    ".hidden_top/s.jsonl",
]

PATTERNS = [
    "*.jsonl",
    "a/*.jsonl",
    "*/*.jsonl",
    "a/*/x?.parquet",
    "a/[bc]*/*",
    "**/*.jsonl",
    "a/**",
    "a/.hidden*",
    "a/.*/*.jsonl",
    ".*/*",
    "a/*",
    "*/*/*",
    "a/*/",
    "a/?/*.parquet",
    "a/[!b]/*",
    "*/e.jsonl/*",
    "a/b/deep/*.parquet",
    "a/*/deep/x3.parquet",
    "a/x1.jsonl/*",
    "[ab]/*.csv",
    "*",
]


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="kos", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(workdir):
    with s3_server(workdir) as server:
        make_bucket(server, BUCKET)
        fs = server.filesystem()
        for rel in TREE:
            with fs.open_output_stream(f"{BUCKET}/tree/{rel}") as out:
                out.write(rel.encode())
        yield server


@pytest.fixture(scope="module")
def local_tree(workdir):
    root = workdir / "tree"
    for rel in TREE:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return str(root)


@pytest.fixture(autouse=True)
def _fresh_block_cache():
    storage._BLOCK_CACHE.clear()
    yield
    storage._BLOCK_CACHE.clear()


def _relative(paths: list[str], root: str) -> list[str]:
    assert all(p.startswith(root + "/") for p in paths), paths
    return [p[len(root) + 1 :] for p in paths]


# ---------------------------------------------------------------- globs


@pytest.mark.parametrize("pattern", PATTERNS)
def test_glob_matches_the_same_on_s3_as_on_local_disk(s3, local_tree, pattern):
    expected = sorted(_relative(glob.glob(f"{local_tree}/{pattern}"), local_tree))
    try:
        local = _relative(expand_paths([f"{local_tree}/{pattern}"], {}), local_tree)
    except FileNotFoundError:
        local = []
    try:
        remote = _relative(expand_paths([f"s3://{BUCKET}/tree/{pattern}"], s3.storage_options()), f"s3://{BUCKET}/tree")
    except FileNotFoundError as exc:
        assert f"s3://{BUCKET}/tree/{pattern}" in str(exc)
        remote = []
    assert local == expected
    assert remote == expected


def test_glob_semantics_spelled_out(s3):
    so = s3.storage_options()

    def rel(pattern):
        return _relative(expand_paths([f"s3://{BUCKET}/tree/{pattern}"], so), f"s3://{BUCKET}/tree")

    # '*' stays within one segment: no nested files, no hidden names
    assert rel("*.jsonl") == ["top.jsonl"]
    assert rel("a/*.jsonl") == ["a/e.jsonl", "a/x1.jsonl"]
    # '**' is '*' (glob.glob without recursive=True)
    assert rel("**/*.jsonl") == rel("*/*.jsonl") == ["a/e.jsonl", "a/x1.jsonl", "b/q.jsonl"]
    # a pattern segment starting with '.' is what matches hidden names
    assert rel("a/.hidden*") == ["a/.hidden.jsonl", "a/.hidden_dir"]
    # a trailing slash means directories, as glob.glob gives them
    assert rel("a/*/") == ["a/b/", "a/c/", "a/e.jsonl/"]


def test_patterns_keep_their_order_and_each_is_sorted(s3):
    so = s3.storage_options()
    base = f"s3://{BUCKET}/tree"
    got = expand_paths([f"{base}/b/*", f"{base}/a/b/x*.parquet", f"{base}/top.jsonl"], so)
    assert got == [
        f"{base}/b/q.jsonl", f"{base}/b/r.csv",
        f"{base}/a/b/x1.parquet", f"{base}/a/b/x10.parquet", f"{base}/a/b/xy.parquet",
        f"{base}/top.jsonl",
    ]


def test_a_pattern_matching_nothing_names_itself(s3):
    pattern = f"s3://{BUCKET}/tree/a/*/*.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(pattern))):
        expand_paths([f"s3://{BUCKET}/tree/*.jsonl", pattern], s3.storage_options())


def test_glob_over_buckets(s3):
    other = "globs-other"
    make_bucket(s3, other)
    with s3.filesystem().open_output_stream(f"{other}/tree/top.jsonl") as out:
        out.write(b"x")
    got = expand_paths(["s3://glob*/tree/top.jsonl"], s3.storage_options())
    assert got == sorted([f"s3://{BUCKET}/tree/top.jsonl", f"s3://{other}/tree/top.jsonl"])


# ---------------------------------------------------------------- session tokens


def _settings(fs: pafs.S3FileSystem) -> dict:
    """The constructor arguments pyarrow pickles an S3FileSystem with."""
    _, (settings,) = fs.__reduce__()
    return settings


@pytest.mark.parametrize("spelling", ["aws_session_token", "session_token", "aws_token", "token", "AWS_SESSION_TOKEN"])
def test_every_spelling_of_the_session_token_reaches_the_filesystem(s3, spelling):
    fs, inner = filesystem_for(f"s3://{BUCKET}/tree/top.jsonl", {**s3.storage_options(), spelling: TOKEN})
    settings = _settings(fs)
    assert settings["session_token"] == TOKEN
    assert settings["access_key"] == s3.key and settings["secret_key"] == s3.secret
    assert (settings["scheme"], settings["endpoint_override"]) == ("http", s3.endpoint.split("://", 1)[1])
    assert inner == f"{BUCKET}/tree/top.jsonl"
    assert TOKEN not in repr(fs)


def test_other_lance_spellings_and_a_bare_endpoint():
    options = {"access_key_id": "AK", "secret_access_key": "SK", "region": "eu-west-1", "endpoint": "minio:9000"}
    settings = _settings(filesystem_for("s3://b/k", options)[0])
    assert (settings["access_key"], settings["secret_key"], settings["region"]) == ("AK", "SK", "eu-west-1")
    # SPEC §4: an endpoint without a scheme is http unless allow-http is false
    assert (settings["scheme"], settings["endpoint_override"]) == ("http", "minio:9000")
    settings = _settings(filesystem_for("s3://b/k", {**options, "aws_allow_http": "false"})[0])
    assert (settings["scheme"], settings["endpoint_override"]) == ("https", "minio:9000")


def test_a_wrong_session_token_is_sent_with_real_reads(s3):
    """SeaweedFS takes a session token as STS credentials and refuses an
    unknown one, so the token demonstrably travels with every request."""
    path = f"s3://{BUCKET}/tree/a/*.jsonl"
    assert expand_paths([path], s3.storage_options())
    with pytest.raises(OSError) as failure:
        expand_paths([path], {**s3.storage_options(), "aws_session_token": TOKEN})
    assert TOKEN not in str(failure.value)
    fs, inner = filesystem_for(f"s3://{BUCKET}/tree/top.jsonl", {**s3.storage_options(), "session_token": TOKEN})
    with pytest.raises(OSError):
        fs.open_input_stream(inner).read()


def test_env_fallback_reads_aws_session_token(s3):
    env = {**s3.env(BUCKET), "AWS_SESSION_TOKEN": TOKEN}
    options = resolve_storage_options(None, None, environ=env)
    assert options["aws_session_token"] == TOKEN
    assert TOKEN not in repr(options) and TOKEN not in str(options)
    assert _settings(filesystem_for(f"s3://{BUCKET}/x", options)[0])["session_token"] == TOKEN


def test_block_session_token_reaches_the_filesystem_and_stays_hidden(s3, monkeypatch):
    from blocks import LanceStorage

    block = LanceStorage(
        endpoint=s3.endpoint, access_key_id=SecretStr(s3.key), secret_access_key=SecretStr(s3.secret),
        session_token=SecretStr(TOKEN), region="us-east-1",
    )
    monkeypatch.setattr(storage, "BLOCK_RESOLVER", lambda name: block.storage_options())
    options = resolve_storage_options({"block": "temporary"}, None)
    assert _settings(filesystem_for(f"s3://{BUCKET}/x", options)[0])["session_token"] == TOKEN
    for shown in (repr(block), block.model_dump_json(), repr(options), str(options)):
        assert TOKEN not in shown


def test_a_block_saved_from_the_environment_keeps_the_session_token(s3, prefect_api, monkeypatch):
    from blocks import LanceStorage
    from deployments.setup import save_storage_block

    for name, value in {**s3.env(BUCKET), "AWS_SESSION_TOKEN": TOKEN}.items():
        monkeypatch.setenv(name, value)
    name = f"from-env-{uuid.uuid4().hex[:8]}"
    save_storage_block(name)
    block = LanceStorage.load(name)
    assert block.storage_options()["aws_session_token"] == TOKEN
    assert TOKEN not in repr(block) and TOKEN not in block.model_dump_json()


def test_the_bucket_creating_filesystem_keeps_the_session_token(s3):
    from deployments.upload import _bucket_creator

    fs, _ = filesystem_for(f"s3://{BUCKET}/x", {**s3.storage_options(), "aws_session_token": TOKEN})
    settings = _settings(_bucket_creator(fs))
    assert settings["session_token"] == TOKEN and settings["allow_bucket_creation"]


def test_no_filesystem_is_built_outside_tasks_storage():
    """Every object-store filesystem comes from ``filesystem_for``, the one
    place that maps storage options (session token included)."""
    builder = re.compile(r"S3FileSystem\(|GcsFileSystem\(|AzureFileSystem\(|from_uri\(|\bboto3?\b|\bfsspec\b|\bs3fs\b")
    found = []
    for folder in ("tasks", "flows", "blocks", "deployments"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "tasks" / "storage.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if builder.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


# ---------------------------------------------------------------- credential expiry


class Clock:
    """``tasks.storage``'s clock, advanced by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rotated_block_is_used_once_the_ttl_has_passed(s3, prefect_api, monkeypatch):
    """A LanceStorage block in a real Prefect API first holds a wrong secret,
    then the right one: reads fail until the cached value expires, then
    succeed, in the same process."""
    from blocks import LanceStorage, storage_options_for

    name = f"rotating-{uuid.uuid4().hex[:8]}"

    def save(secret: str) -> None:
        LanceStorage(
            endpoint=s3.endpoint, region="us-east-1", access_key_id=SecretStr(s3.key), secret_access_key=SecretStr(secret)
        ).save(name, overwrite=True)

    clock = Clock()
    monkeypatch.setattr(storage, "_clock", clock)
    monkeypatch.setenv(storage.CREDENTIALS_TTL_ENV, "60")
    monkeypatch.setattr(storage, "BLOCK_RESOLVER", storage_options_for)
    pattern = [f"s3://{BUCKET}/tree/a/*.jsonl"]
    wrong = "wrong-" + uuid.uuid4().hex
    save(wrong)
    with pytest.raises(OSError):
        expand_paths(pattern, resolve_storage_options({"block": name}, None))
    save(s3.secret)  # rotated
    clock.now += 59  # within the TTL: the cached, old value
    assert resolve_storage_options({"block": name}, None)["aws_secret_access_key"] == wrong
    clock.now += 1
    options = resolve_storage_options({"block": name}, None)
    assert options["aws_secret_access_key"] == s3.secret
    assert _relative(expand_paths(pattern, options), f"s3://{BUCKET}/tree") == ["a/e.jsonl", "a/x1.jsonl"]
    assert s3.secret not in repr(options) and wrong not in repr(options)


def test_block_failures_are_cached_for_the_ttl_too(monkeypatch):
    calls = []

    def resolver(name):
        calls.append(name)
        if len(calls) == 1:
            raise storage.StorageConfigError(f"cannot load the LanceStorage block {name!r}")
        return {"aws_access_key_id": "AK2"}

    clock = Clock()
    monkeypatch.setattr(storage, "_clock", clock)
    monkeypatch.setattr(storage, "BLOCK_RESOLVER", resolver)
    monkeypatch.setenv(storage.CREDENTIALS_TTL_ENV, "30")
    for _ in range(3):  # many nodes naming one missing block: one lookup
        with pytest.raises(storage.StorageConfigError, match="cannot load"):
            resolve_storage_options({"block": "late"}, None)
    assert calls == ["late"]
    clock.now += 30
    assert resolve_storage_options({"block": "late"}, None) == {"aws_access_key_id": "AK2"}
    assert calls == ["late", "late"]
    monkeypatch.setenv(storage.CREDENTIALS_TTL_ENV, "0")  # 0: every use asks again
    resolve_storage_options({"block": "late"}, None)
    assert calls == ["late", "late", "late"]


def test_ttl_setting(monkeypatch):
    monkeypatch.delenv(storage.CREDENTIALS_TTL_ENV, raising=False)
    assert storage.credentials_ttl() == storage.DEFAULT_CREDENTIALS_TTL_S == 300.0
    monkeypatch.setenv(storage.CREDENTIALS_TTL_ENV, "0")
    assert storage.credentials_ttl() == 0.0
    monkeypatch.setenv(storage.CREDENTIALS_TTL_ENV, "soon")
    with pytest.raises(storage.StorageConfigError, match=storage.CREDENTIALS_TTL_ENV):
        storage.credentials_ttl()
