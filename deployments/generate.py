"""Generate prefect.yaml from examples/*.yaml (one deployment per example).

    python -m deployments.generate            # rewrite prefect.yaml
    python -m deployments.generate --check    # exit 1 if prefect.yaml is stale

Run it after adding an example; ``python -m deployments.setup`` runs it too.
Each example gets a deployment on the ``process`` pool (this machine) and a
``-k8s`` twin on the ``kubernetes`` pool (``mode: k8s``; the Job template,
image and working directory are the cluster side's, see k8s/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
EXAMPLES = "examples"
ENTRYPOINT = "flows/pipeline.py:kaiyuan_pipeline"
FLOW_NAME = "kaiyuan-pipeline"
PROCESS_POOL = "kaiyuan-process"
K8S_POOL = "kaiyuan-k8s"
# Where the flow code lives inside the cluster image (owned by k8s/; keep in
# step with its Dockerfile / job template).
K8S_WORKDIR = "/opt/kaiyuan"
# The example that ships with schedules (inactive; activate with
# `python -m deployments.setup --activate-schedules`).
SCHEDULED_EXAMPLE = "read_write"


def deployment_name(example: Path) -> str:
    return example.stem.replace("_", "-")


def _description(path: Path) -> str:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return f"Kaiyuan pipeline {path.name}"


def examples(root: Path = ROOT) -> list[Path]:
    return sorted((root / EXAMPLES).glob("*.yaml"))


def _header() -> list[str]:
    """prefect.yaml's top: how to use it, the work pools, pull steps and schedules."""
    return [
        "# Prefect deployments for Kaiyuan Flows. GENERATED from examples/*.yaml by",
        "# `python -m deployments.generate` (edit deployments/generate.py, not this file).",
        "#",
        "#   python -m deployments.setup            # pools + blocks + deploy, idempotent",
        "#   prefect --no-prompt deploy --all       # once the work pools exist",
        "#   prefect deployment run 'kaiyuan-pipeline/read-write'",
        "#   prefect deployment run 'kaiyuan-pipeline/read-write' --param overrides='{\"ray.app_name\": \"x\"}'",
        "name: kaiyuan-flows",
        "prefect-version: 3.9.1",
        "",
        "# The code is this checkout: no build or push. Process deployments get",
        "# prefect's default pull step (set_working_directory to the directory you",
        "# deploy from); the -k8s ones set the image's directory below.",
        "build: null",
        "push: null",
        "",
        "definitions:",
        "  work_pools:",
        "    process: &process",
        f"      name: {PROCESS_POOL}",
        "      work_queue_name: default",
        "      job_variables: {}",
        "    kubernetes: &kubernetes",
        f"      name: {K8S_POOL}",
        "      work_queue_name: default",
        "      # image, namespace, service account, resources: the pool's base job",
        "      # template (k8s/; applied by `python -m deployments.setup`).",
        "      job_variables: {}",
        "  pull:",
        "    k8s: &k8s_pull",
        "      - prefect.deployments.steps.set_working_directory:",
        f"          directory: {K8S_WORKDIR}",
        "  schedules:",
        "    # Shipped inactive. Activate: python -m deployments.setup --activate-schedules",
        "    # (or: prefect deployment schedule resume kaiyuan-pipeline/read-write SCHEDULE_ID).",
        "    nightly: &nightly",
        "      cron: \"0 2 * * *\"",
        "      timezone: UTC",
        "      slug: nightly",
        "      active: false",
        "    every-6h: &every_6h",
        "      interval: 21600",
        "      anchor_date: \"2026-01-01T00:00:00Z\"",
        "      timezone: UTC",
        "      slug: every-6h",
        "      active: false",
        "",
        "deployments:",
    ]


def _deployments(path: Path) -> list[str]:
    """The two deployments of one example: a process one and a -k8s one."""
    name = deployment_name(path)
    rel = f"{EXAMPLES}/{path.name}"
    try:
        app = (yaml.safe_load(path.read_text()) or {}).get("ray", {}).get("app_name") or path.stem
    except yaml.YAMLError:
        app = path.stem
    desc = _description(path).replace('"', "'")
    out: list[str] = []
    for k8s in (False, True):
        out += [
            f"  - name: {name}{'-k8s' if k8s else ''}",
            f"    entrypoint: {ENTRYPOINT}",
            f"    description: \"{desc}\"",
            f"    tags: [kaiyuan, \"config:{path.stem}\", \"app:{app}\"{', k8s' if k8s else ''}]",
            "    parameters:",
            f"      config: {rel}",
            "      overrides: {}",
        ]
        if k8s:
            out += ["      mode: k8s", "    work_pool: *kubernetes", "    pull: *k8s_pull"]
        else:
            out += ["    work_pool: *process"]
        if path.stem == SCHEDULED_EXAMPLE and not k8s:
            out += ["    schedules: [*nightly, *every_6h]"]
        else:
            out += ["    schedules: []"]
    return out


def render(root: Path = ROOT) -> str:
    out = _header()
    for path in examples(root):
        out += _deployments(path)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if prefect.yaml is not up to date")
    args = parser.parse_args(argv)
    text = render()
    current = PREFECT_YAML.read_text() if PREFECT_YAML.exists() else None
    if args.check:
        if current != text:
            print("prefect.yaml is stale: run `python -m deployments.generate`", file=sys.stderr)
            return 1
        print("prefect.yaml is up to date")
        return 0
    if current != text:
        PREFECT_YAML.write_text(text)
        print(f"wrote {PREFECT_YAML.relative_to(ROOT)} ({len(examples())} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
