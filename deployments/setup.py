"""One command for Prefect operations: work pools, blocks, deployments. Idempotent.

    python -m deployments.setup                       # pools + block types + deploy --all
    python -m deployments.setup --activate-schedules  # ... and turn the shipped schedules on
    python -m deployments.setup --storage-block minio # also save a LanceStorage block from
                                                      # AWS_*/MINIO_* env vars (secrets as secrets)
    python -m deployments.setup --ray-block prod-cluster --ray-address auto
    python -m deployments.setup --no-deploy           # pools and blocks only

Talks to the server in PREFECT_API_URL (or the active profile). Steps:
1. regenerate prefect.yaml from examples/*.yaml (deployments.generate);
2. create (or update) the work pools: ``kaiyuan-process`` (type process) and
   ``kaiyuan-k8s`` (type kubernetes, base job template from
   ``k8s/base-job-template.json`` when that file exists, else
   prefect-kubernetes' default);
3. register the block types in ``blocks`` (same as ``prefect block register -m blocks``)
   and optionally save block documents;
4. ``prefect --no-prompt deploy --all`` from the repository root;
5. optionally activate the schedules of the scheduled example.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from deployments.generate import FLOW_NAME, K8S_POOL, PROCESS_POOL, ROOT, SCHEDULED_EXAMPLE, deployment_name

# The cluster side (k8s/) owns this file; when present it becomes the
# kubernetes pool's base job template.
K8S_BASE_JOB_TEMPLATE = ROOT / "k8s" / "base-job-template.json"


def _default_template(pool_type: str) -> dict:
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


def ensure_work_pools(client, k8s: bool = True) -> list[str]:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    pools = [(PROCESS_POOL, "process", None)]
    if k8s:
        template = json.loads(K8S_BASE_JOB_TEMPLATE.read_text()) if K8S_BASE_JOB_TEMPLATE.exists() else None
        pools.append((K8S_POOL, "kubernetes", template))
    done = []
    for name, pool_type, template in pools:
        try:
            client.read_work_pool(name)
            if template is not None:
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            done.append(f"{name} ({pool_type}): exists")
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(name=name, type=pool_type, base_job_template=template or _default_template(pool_type))
            )
            done.append(f"{name} ({pool_type}): created")
    return done


def register_blocks() -> list[str]:
    from blocks import LanceStorage, RayCluster

    names = []
    for block in (RayCluster, LanceStorage):
        block.register_type_and_schema()
        names.append(block.get_block_type_slug())
    return names


def save_storage_block(name: str) -> None:
    """A LanceStorage block from SPEC §4's environment variables."""
    from pydantic import SecretStr

    from blocks import LanceStorage

    env = os.environ

    def first(*keys):
        return next((env[k] for k in keys if env.get(k)), None)

    allow = env.get("LANCE_AWS_ALLOW_HTTP")
    LanceStorage(
        endpoint=first("AWS_ENDPOINT_URL", "MINIO_ENDPOINT"),
        region=first("AWS_REGION", "MINIO_REGION"),
        allow_http=None if allow is None else allow.strip().lower() in ("1", "true", "yes", "on"),
        access_key_id=SecretStr(v) if (v := first("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY")) else None,
        secret_access_key=SecretStr(v) if (v := first("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY")) else None,
        session_token=SecretStr(v) if (v := first("AWS_SESSION_TOKEN")) else None,
    ).save(name, overwrite=True)


def save_ray_block(name: str, address: str | None, namespace: str | None) -> None:
    from blocks import RayCluster

    RayCluster(address=address, namespace=namespace).save(name, overwrite=True)


def deploy(names: list[str] | None = None) -> None:
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    if names:
        for n in names:
            cmd += ["--name", n]
    else:
        cmd.append("--all")
    subprocess.run(cmd, cwd=ROOT, check=True)


def activate_schedules(client, active: bool = True) -> list[str]:

    name = f"{FLOW_NAME}/{deployment_name(Path(SCHEDULED_EXAMPLE + '.yaml'))}"
    deployment = client.read_deployment_by_name(name)
    changed = []
    for schedule in deployment.schedules:
        client.update_deployment_schedule(deployment.id, schedule.id, active=active)
        changed.append(f"{name} schedule {schedule.slug or schedule.id}: {'active' if active else 'inactive'}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-deploy", action="store_true", help="create pools and blocks only")
    parser.add_argument("--no-k8s-pool", action="store_true", help="skip the kubernetes work pool (and its deployments)")
    parser.add_argument("--name", action="append", help="deploy only this deployment (repeatable)")
    parser.add_argument("--activate-schedules", action="store_true", help=f"turn on the schedules of '{SCHEDULED_EXAMPLE}'")
    parser.add_argument("--deactivate-schedules", action="store_true")
    parser.add_argument("--storage-block", metavar="NAME", help="save a LanceStorage block NAME from AWS_*/MINIO_* env vars")
    parser.add_argument("--ray-block", metavar="NAME", help="save a RayCluster block NAME")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--ray-namespace", default=None)
    parser.add_argument("--no-generate", action="store_true", help="do not regenerate prefect.yaml from examples/")
    args = parser.parse_args(argv)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.client.orchestration import get_client

    if not args.no_generate:
        from deployments.generate import main as generate

        generate([])
    with get_client(sync_client=True) as client:
        for line in ensure_work_pools(client, k8s=not args.no_k8s_pool):
            print(f"work pool {line}")
    for slug in register_blocks():
        print(f"block type {slug}: registered")
    if args.storage_block:
        save_storage_block(args.storage_block)
        print(f"block kaiyuan-lance-storage/{args.storage_block}: saved")
    if args.ray_block:
        save_ray_block(args.ray_block, args.ray_address, args.ray_namespace)
        print(f"block kaiyuan-ray-cluster/{args.ray_block}: saved")
    if not args.no_deploy:
        names = args.name
        if args.no_k8s_pool and not names:
            import yaml

            spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
            names = [d["name"] for d in spec["deployments"] if d["work_pool"]["name"] != K8S_POOL]
        deploy(names)
    if args.activate_schedules or args.deactivate_schedules:
        with get_client(sync_client=True) as client:
            for line in activate_schedules(client, active=args.activate_schedules):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
