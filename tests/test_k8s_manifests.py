"""Cluster mode, offline: every manifest in k8s/ against the Kubernetes API
schemas (kubernetes-validate), the RayCluster against the vendored KubeRay
CRD schema subset, the Helm values of Prefect's server and worker charts
against the charts' vendored values.schema.json, the work-pool base job
template rendered by prefect-kubernetes' own job-configuration code, and the
credential rules.

No Kubernetes API server can run here, so nothing is applied; these tests
check what `kubectl apply` and the Prefect worker would send.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
TEMPLATE = K8S / "base-job-template.json"
RAY_SCHEMA = K8S / "schemas" / "raycluster.ray.io-v1.kuberay-1.6.2.subset.schema.json"
DEV_SECRETS_DIR = K8S / "dev-secrets"
DEV_LABEL = "kaiyuan.dev/local-dev-only"
# The Kubernetes version the manifests are checked against (kubernetes-validate
# ships the schemas; kind's default node image is of this minor or newer).
K8S_VERSION = "1.33.0"
# YAML files in k8s/ that are not Kubernetes objects, and what they are.
NOT_API_OBJECTS = {
    "kind/cluster.yaml": "kind cluster configuration (kind.x-k8s.io/v1alpha4)",
    "ray/kuberay-operator-values.yaml": "Helm values for the kuberay-operator chart",
    "prefect/server-values.yaml": "Helm values for Prefect's prefect-server chart",
    "prefect/worker-values.yaml": "Helm values for Prefect's prefect-worker chart",
}
# Prefect's official charts (prefect-helm): values file -> vendored values.schema.json
# of the chart version pinned in the Makefile (PREFECT_CHART_VERSION).
PREFECT_CHART_VERSION = "2026.9.3212605"
PREFECT_VALUES = {
    "prefect-server": (K8S / "prefect" / "server-values.yaml", K8S / "schemas" / f"prefect-server.values.{PREFECT_CHART_VERSION}.schema.json"),
    "prefect-worker": (K8S / "prefect" / "worker-values.yaml", K8S / "schemas" / f"prefect-worker.values.{PREFECT_CHART_VERSION}.schema.json"),
}
WORK_POOL = "kaiyuan-k8s"
IMAGE = "kaiyuan-flows:latest"
# prefect-kubernetes (0.8) insists on these two keys in the *pod* spec of a
# work-pool template (its own default template has them too); they are Job
# fields, so the API server drops them there with an "unknown field" warning.
PREFECT_POD_SPEC_QUIRKS = ("completions", "parallelism")

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in yaml_files():
        rel = path.relative_to(K8S).as_posix()
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{rel}#{i}", doc))
    return out


def api_objects() -> list[tuple[str, dict]]:
    return [(where, doc) for where, doc in documents() if where.split("#")[0] not in NOT_API_OBJECTS]


def k8s_validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def prefect_values(chart: str) -> dict:
    return yaml.safe_load(PREFECT_VALUES[chart][0].read_text())


def prefect_schema(chart: str) -> dict:
    return json.loads(PREFECT_VALUES[chart][1].read_text())


def validate_values(values: dict, chart: str) -> None:
    # The charts' schemas name the generic "http://json-schema.org/schema#";
    # Helm validates them as draft 7.
    jsonschema.Draft7Validator(prefect_schema(chart)).validate(values)


def pod_templates(raycluster: dict) -> list[tuple[str, dict]]:
    spec = raycluster["spec"]
    out = [("headGroupSpec", spec["headGroupSpec"]["template"])]
    out += [(f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


# ------------------------------------------------------------------ schemas


def test_every_yaml_file_is_known():
    """Each YAML document is either a Kubernetes object (apiVersion + kind) or
    one of the listed non-object files, so nothing escapes validation."""
    assert yaml_files(), "k8s/ has no manifests"
    for where, doc in documents():
        rel = where.split("#")[0]
        if rel in NOT_API_OBJECTS:
            continue
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{where}: not a Kubernetes object"
    for rel in NOT_API_OBJECTS:
        assert (K8S / rel).exists(), rel


@pytest.mark.parametrize("where,doc", [d for d in api_objects() if d[1]["apiVersion"] != "ray.io/v1"], ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_validates_against_kubernetes_api_schema(where, doc):
    k8s_validate(doc)


def test_kubernetes_validate_catches_mistakes():
    """The validator is strict: a misspelt field and a wrong type both fail."""
    (where, deployment) = next(d for d in api_objects() if d[1]["kind"] == "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(bad)


def rayclusters() -> list[tuple[str, dict]]:
    return [d for d in api_objects() if d[1]["apiVersion"] == "ray.io/v1"]


def test_raycluster_validates_against_vendored_kuberay_crd_schema():
    schema = json.loads(RAY_SCHEMA.read_text())
    assert schema["x-kuberay-version"] == "1.6.2"
    clusters = rayclusters()
    assert [doc["kind"] for _, doc in clusters] == ["RayCluster"]
    for where, doc in clusters:
        jsonschema.Draft7Validator.check_schema(schema)
        jsonschema.validate(doc, schema)
        # The pod templates inside are plain core/v1 PodTemplateSpecs.
        for group, template in pod_templates(doc):
            k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"check-{group[:20].lower().replace('[', '-').replace(']', '')}"}, "template": template})


def test_raycluster_schema_catches_mistakes():
    schema = json.loads(RAY_SCHEMA.read_text())
    (_, doc) = rayclusters()[0]
    for mutate in (
        lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=3),  # typo
        lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
        lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),  # must be a string
        lambda d: d["spec"].update(enableInTreeAutoscaling="yes"),
    ):
        bad = copy.deepcopy(doc)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_raycluster_shape_and_versions():
    import ray

    (_, doc) = rayclusters()[0]
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__, "RayCluster rayVersion must match the Ray in the image"
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > group["minReplicas"]
    for _, template in pod_templates(doc):
        assert template["spec"]["containers"][0]["image"] == "kaiyuan-flows:latest"
    assert spec["authOptions"] == {"mode": "token", "secretName": "kaiyuan-ray-auth"}


def test_kind_cluster_config():
    cfg = yaml.safe_load((K8S / "kind" / "cluster.yaml").read_text())
    schema = {
        "type": "object",
        "required": ["kind", "apiVersion", "nodes"],
        "additionalProperties": False,
        "properties": {
            "kind": {"const": "Cluster"},
            "apiVersion": {"const": "kind.x-k8s.io/v1alpha4"},
            "name": {"type": "string"},
            "nodes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "additionalProperties": False,
                    "properties": {
                        "role": {"enum": ["control-plane", "worker"]},
                        "image": {"type": "string"},
                        "extraPortMappings": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["containerPort", "hostPort"],
                                "additionalProperties": False,
                                "properties": {
                                    "containerPort": {"type": "integer"},
                                    "hostPort": {"type": "integer"},
                                    "listenAddress": {"type": "string"},
                                    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    }
    jsonschema.validate(cfg, schema)
    # Every host port mapping lands on a NodePort that a Service really opens.
    node_ports = {
        p["nodePort"]
        for _, doc in api_objects()
        if doc["kind"] == "Service" and doc["spec"].get("type") == "NodePort"
        for p in doc["spec"]["ports"]
        if "nodePort" in p
    }
    service = prefect_values("prefect-server")["service"]
    assert service["type"] == "NodePort" and service["port"] == service["targetPort"] == 4200
    node_ports.add(service["nodePort"])
    mapped = {m["containerPort"] for n in cfg["nodes"] for m in n.get("extraPortMappings", [])}
    assert mapped == node_ports == {30420, 30265, 30900}


# ------------------------------------------------------------------ Prefect Helm values


@pytest.mark.parametrize("chart", sorted(PREFECT_VALUES))
def test_prefect_values_validate_against_vendored_chart_schema(chart):
    """What `helm install` itself checks first: the values against the
    chart's values.schema.json (vendored for the pinned chart version)."""
    schema = prefect_schema(chart)
    jsonschema.Draft7Validator.check_schema(schema)
    validate_values(prefect_values(chart), chart)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^PREFECT_CHART_VERSION\s*\?=\s*{re.escape(PREFECT_CHART_VERSION)}\s*$", makefile, re.M)
    assert f"prefect/{chart} --version $(PREFECT_CHART_VERSION)" in makefile


def test_prefect_worker_values_with_the_base_job_template_validate():
    """The Makefile hands k8s/base-job-template.json to the chart as a string
    (--set-file worker.config.baseJobTemplate.configuration=...)."""
    values = copy.deepcopy(prefect_values("prefect-worker"))
    values["worker"]["config"]["baseJobTemplate"]["configuration"] = TEMPLATE.read_text()
    validate_values(values, "prefect-worker")
    assert "--set-file worker.config.baseJobTemplate.configuration=k8s/base-job-template.json" in (ROOT / "Makefile").read_text()


def test_prefect_schemas_catch_mistakes():
    for chart, mutate in (
        ("prefect-server", lambda v: v["server"].update(basicAuth_={"enabled": True})),  # unknown key
        ("prefect-server", lambda v: v["server"]["resources"]["requests"].update(gpu="1")),
        ("prefect-server", lambda v: v["server"].update(replicaCount="one")),
        ("prefect-worker", lambda v: v["worker"]["config"].update(workpool=WORK_POOL)),  # typo
        ("prefect-worker", lambda v: v["worker"].update(apiConfig="server")),  # pre-2025.3 name
        ("prefect-worker", lambda v: v["worker"]["config"].update(installPolicy="sometimes")),
    ):
        bad = copy.deepcopy(prefect_values(chart))
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate_values(bad, chart)


def test_prefect_server_values():
    v = prefect_values("prefect-server")
    assert v["fullnameOverride"] == "prefect-server"
    image = v["global"]["prefect"]["image"]
    assert f"{image['repository']}:{image['prefectTag']}" == IMAGE
    server = v["server"]
    # Our image has no /opt/prefect/entrypoint.sh (the chart's default command).
    assert server["command"] == ["/usr/local/bin/kaiyuan-entrypoint"]
    assert server["args"][:3] == ["prefect", "server", "start"]
    assert server["basicAuth"] == {"enabled": True, "existingSecret": "prefect-auth"}
    assert "authString" not in server["basicAuth"]
    assert server["uiConfig"]["prefectUiApiUrl"] == "http://localhost:4200/api"
    assert server["readinessProbe"]["enabled"] and server["livenessProbe"]["enabled"]
    # Database: the hand-written PostgreSQL, URL from an existing Secret; no bundled subchart.
    assert v["secret"] == {"create": False, "name": "prefect-database"}
    assert v["postgresql"]["enabled"] is False and v["sqlite"]["enabled"] is False
    assert v["serviceAccount"] == {"create": False, "name": "prefect-server"}


def test_prefect_worker_values():
    v = prefect_values("prefect-worker")
    worker = v["worker"]
    assert v["fullnameOverride"] == "prefect-worker"
    assert f"{worker['image']['repository']}:{worker['image']['prefectTag']}" == IMAGE
    assert worker["command"] == ["/usr/local/bin/kaiyuan-entrypoint"]
    assert worker["config"]["type"] == "kubernetes"
    assert worker["config"]["observerClusterWide"] is False
    # The worker reaches the server's Service with the auth string from the Secret.
    api = worker["selfHostedServerApiConfig"]
    assert worker["apiConfig"] == "selfHostedServer"
    assert api["apiUrl"] == "http://prefect-server.kaiyuan.svc.cluster.local:4200/api"
    assert api["basicAuth"] == {"enabled": True, "existingSecret": "prefect-auth"}
    env = {e["name"]: e.get("value") for e in worker["extraEnvVars"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"] == "prefect-auth"
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"] == "auth-string"
    # ServiceAccount and least-privilege Role are ours (k8s/rbac), not the chart's.
    assert v["serviceAccount"] == {"create": False, "name": "prefect-worker"}
    assert v["role"]["create"] is False and v["rolebinding"]["create"] is False
    assert worker["clusterUid"], "without it the chart needs cluster-wide read access at install time"


def test_work_pool_name_matches_prefect_yaml():
    pools = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["work_pools"]
    assert pools["kubernetes"]["name"] == WORK_POOL
    assert prefect_values("prefect-worker")["worker"]["config"]["workPool"] == WORK_POOL
    # The template's default image is the one the charts run.
    variables = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    assert variables["image"]["default"] == IMAGE


# ------------------------------------------------------------------ references between objects


def test_references_resolve():
    """Every Secret, ConfigMap, ServiceAccount and PVC a pod refers to is
    created by k8s/ (or, for the RayCluster head, by KubeRay itself)."""
    objs = api_objects()
    have = {(doc["kind"], doc["metadata"]["name"]) for _, doc in objs}
    data_keys = {
        (doc["kind"], doc["metadata"]["name"]): set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for _, doc in objs
        if doc["kind"] in ("Secret", "ConfigMap")
    }
    template = json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]
    pod_specs = [("base-job-template.json", template["spec"]["template"]["spec"])]
    for where, doc in objs:
        if doc["kind"] in ("Deployment", "Job"):
            pod_specs.append((where, doc["spec"]["template"]["spec"]))
        if doc["kind"] == "RayCluster":
            pod_specs += [(f"{where} {g}", t["spec"]) for g, t in pod_templates(doc)]
    problems = []
    for where, spec in pod_specs:
        sa = spec.get("serviceAccountName")
        if sa and "{{" not in sa and ("ServiceAccount", sa) not in have:
            problems.append(f"{where}: ServiceAccount {sa}")
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol and ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) not in have:
                problems.append(f"{where}: PVC {vol['persistentVolumeClaim']['claimName']}")
            if "configMap" in vol and ("ConfigMap", vol["configMap"]["name"]) not in have:
                problems.append(f"{where}: ConfigMap {vol['configMap']['name']}")
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in src:
                        name = src[key]["name"]
                        name = "kaiyuan-object-store" if name == "{{ object_store_secret }}" else name
                        if (kind, name) not in have:
                            problems.append(f"{where}: {kind} {name}")
            for env in c.get("env", []):
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    ref = env.get("valueFrom", {}).get(key)
                    if ref and ref["key"] not in data_keys.get((kind, ref["name"]), set()):
                        problems.append(f"{where}: {kind} {ref['name']} key {ref['key']}")
    # Secrets and ServiceAccounts the Helm values name (dev-secrets or your own).
    server, worker = prefect_values("prefect-server"), prefect_values("prefect-worker")
    for where, kind, name, key in (
        ("server-values.yaml server.basicAuth", "Secret", server["server"]["basicAuth"]["existingSecret"], "auth-string"),
        ("server-values.yaml secret", "Secret", server["secret"]["name"], "connection-string"),
        ("worker-values.yaml basicAuth", "Secret", worker["worker"]["selfHostedServerApiConfig"]["basicAuth"]["existingSecret"], "auth-string"),
    ):
        if key not in data_keys.get((kind, name), set()):
            problems.append(f"{where}: {kind} {name} key {key}")
    for values in (server, worker):
        if ("ServiceAccount", values["serviceAccount"]["name"]) not in have:
            problems.append(f"ServiceAccount {values['serviceAccount']['name']}")
    assert not problems, problems
    # The template's default object-store Secret is the one k8s/ creates.
    variables = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    assert ("Secret", variables["object_store_secret"]["default"]) in have
    assert ("ServiceAccount", variables["service_account_name"]["default"]) in have


# ------------------------------------------------------------------ least privilege


def test_rbac_is_least_privilege():
    objs = [doc for _, doc in api_objects()]
    kinds = {doc["kind"] for doc in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "no cluster-wide RBAC"
    roles = {doc["metadata"]["name"]: doc for doc in objs if doc["kind"] == "Role"}
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert "secrets" not in rule["resources"], f"Role {role['metadata']['name']} may read Secrets"
    bindings = [doc for doc in objs if doc["kind"] == "RoleBinding"]
    bound = {s["name"] for b in bindings for s in b["subjects"]}
    assert bound == {"prefect-worker"}
    accounts = {doc["metadata"]["name"]: doc for doc in objs if doc["kind"] == "ServiceAccount"}
    for name, sa in accounts.items():
        if name not in bound:
            assert sa.get("automountServiceAccountToken") is False, f"{name} mounts an API token it does not need"
    worker_rules = {(g, r): set(rule["verbs"]) for rule in roles["prefect-worker"]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "delete", "watch"} <= worker_rules[("batch", "jobs")]
    # Flow-run pods: their own account, no token.
    template = json.loads(TEMPLATE.read_text())
    assert template["variables"]["properties"]["service_account_name"]["default"] == "kaiyuan-flow-run"
    assert template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_pods_run_as_non_root():
    template = json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]
    specs = [template["spec"]["template"]["spec"]]
    for _, doc in api_objects():
        if doc["kind"] in ("Deployment", "Job"):
            specs.append(doc["spec"]["template"]["spec"])
        if doc["kind"] == "RayCluster":
            specs += [t["spec"] for _, t in pod_templates(doc)]
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    server, worker = prefect_values("prefect-server")["server"], prefect_values("prefect-worker")["worker"]
    for ctx in (server["podSecurityContext"], worker["podSecurityContext"]):
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000  # the image's user
    for ctx in (server["containerSecurityContext"], worker["containerSecurityContext"], worker["initContainer"]["containerSecurityContext"]):
        assert ctx["runAsNonRoot"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}


# ------------------------------------------------------------------ credentials

CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)
# Names that look like credentials but hold none (names of Secrets, modes).
NOT_CREDENTIALS = {
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME",
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY",
}


def _dev_secret_values() -> list[str]:
    values = []
    for path in DEV_SECRETS_DIR.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                values += [str(v) for v in doc.get("stringData", {}).values()]
    return values


def _walk_env(obj, where="", out=None):
    """(where, env entry) for every container env entry in any nested object."""
    out = [] if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                out += [(where, e) for e in v if isinstance(e, dict)]
            else:
                _walk_env(v, f"{where}.{k}", out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _walk_env(v, f"{where}[{i}]", out)
    return out


def test_secrets_only_in_marked_local_dev_files():
    for where, doc in api_objects():
        if doc["kind"] != "Secret":
            continue
        assert where.startswith("dev-secrets/"), f"{where}: Secrets with values belong in k8s/dev-secrets/ only"
        assert doc["metadata"]["labels"].get(DEV_LABEL) == "true", f"{where}: not labelled {DEV_LABEL}"
        assert "LOCAL DEVELOPMENT ONLY" in doc["metadata"]["annotations"]["kaiyuan.dev/warning"]
    for path in DEV_SECRETS_DIR.glob("*.yaml"):
        assert "LOCAL DEVELOPMENT ONLY" in path.read_text().split("apiVersion")[0], f"{path.name}: header must say LOCAL DEVELOPMENT ONLY"


def test_no_credential_literals_outside_local_dev_secrets():
    """Credentials reach pods only through secretKeyRef / secretRef; no env
    entry with a credential-like name has a literal value, no ConfigMap holds
    one, and no dev-Secret value appears anywhere else in the repository's
    cluster files."""
    template = json.loads(TEMPLATE.read_text())
    sources = [(where, doc) for where, doc in api_objects() if doc["kind"] != "Secret"]
    sources.append(("base-job-template.json", template))
    sources += [(f"prefect/{chart} values", prefect_values(chart)) for chart in PREFECT_VALUES]
    problems = []
    for where, doc in sources:
        for path, env in _walk_env(doc):
            name = env.get("name", "")
            if CREDENTIAL_NAME.search(name) and name not in NOT_CREDENTIALS and env.get("value") not in (None, "token"):
                problems.append(f"{where}{path}: env {name} has a literal value")
        if doc.get("kind") == "ConfigMap":
            for key in doc.get("data", {}):
                if CREDENTIAL_NAME.search(key) and not key.endswith(".json"):
                    problems.append(f"{where}: ConfigMap key {key}")
    # The template's env defaults null the credential variables so the worker's
    # own values are never copied into a Job manifest.
    for chart in PREFECT_VALUES:
        if "authString" in json.dumps(prefect_values(chart)):
            problems.append(f"{chart} values: a basicAuth.authString literal (use existingSecret)")
    env_defaults = template["variables"]["properties"]["env"]["default"]
    for name in ("PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
        assert name in env_defaults and env_defaults[name] is None, name
    values = _dev_secret_values()
    assert len(values) >= 5
    files = [p for p in K8S.rglob("*") if p.is_file() and DEV_SECRETS_DIR not in p.parents]
    files += [ROOT / "Makefile", ROOT / "Dockerfile"] + list(ROOT.glob("*.md"))
    for path in files:
        if path.suffix in (".png", ".jpg"):
            continue
        text = path.read_text(errors="ignore")
        for value in values:
            if len(value) >= 8 and value in text:
                problems.append(f"{path.relative_to(ROOT)} contains the dev credential {value[:4]}...")
    assert not problems, "\n".join(problems)


def test_credential_check_would_catch_a_literal():
    doc = {"kind": "Deployment", "spec": {"template": {"spec": {"containers": [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]}]}}}}
    hits = [e for _, e in _walk_env(doc) if CREDENTIAL_NAME.search(e["name"]) and e.get("value")]
    assert hits


# ------------------------------------------------------------------ work-pool base job template


def _render(values: dict, worker_env: dict[str, str]) -> dict:
    """Render the pool's template exactly as the worker does for a flow run:
    KubernetesWorkerJobConfiguration.from_template_and_values (job variables)
    + prepare_for_flow_run (flow-run env, labels, command, name)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    updates = {PREFECT_API_URL: worker_env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: worker_env["PREFECT_API_AUTH_STRING"]}
    with temporary_settings(updates=updates):
        config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
        flow_id = uuid.uuid4()
        flow_run = FlowRun(id=uuid.uuid4(), name="quiet-heron", flow_id=flow_id, parameters={"config": "examples/read_write.yaml", "mode": "k8s"})
        deployment = DeploymentResponse(id=uuid.uuid4(), name="read-write-k8s", flow_id=flow_id)
        config.prepare_for_flow_run(flow_run, deployment=deployment)
    return config.job_manifest


def _validate_job(manifest: dict) -> None:
    job = copy.deepcopy(manifest)
    pod = job["spec"]["template"]["spec"]
    for key in PREFECT_POD_SPEC_QUIRKS:
        assert pod.pop(key) == 1
    k8s_validate(job)


WORKER_ENV = {
    "PREFECT_API_URL": "http://prefect-server.kaiyuan.svc.cluster.local:4200/api",
    "PREFECT_API_AUTH_STRING": "admin:worker-side-secret-value",
}


def _env(manifest: dict) -> dict[str, dict]:
    return {e["name"]: e for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_work_pool_template_renders_a_valid_job_for_a_flow_run():
    manifest = _render({}, WORKER_ENV)
    _validate_job(manifest)
    spec = manifest["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "kaiyuan"
    assert manifest["metadata"]["generateName"].startswith("quiet-heron")
    assert manifest["metadata"]["labels"]["prefect.io/flow-run-name"] == "quiet-heron"
    # Kept for 7 days after it finishes, so kubectl and Prefect history agree.
    assert spec["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    assert spec["backoffLimit"] == 0
    assert container["image"] == "kaiyuan-flows:latest"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert pod["serviceAccountName"] == "kaiyuan-flow-run"
    env = _env(manifest)
    # Prefect: the API URL from the worker, the auth string from the Secret.
    assert env["PREFECT_API_URL"]["value"] == WORKER_ENV["PREFECT_API_URL"]
    assert env["PREFECT_API_AUTH_STRING"] == {"name": "PREFECT_API_AUTH_STRING", "valueFrom": {"secretKeyRef": {"name": "prefect-auth", "key": "auth-string"}}}
    assert "PREFECT__FLOW_RUN_ID" in env
    # Object store: keys from the Secret, endpoint/bucket from the ConfigMap.
    assert {"secretRef": {"name": "kaiyuan-object-store"}} in container["envFrom"]
    assert {"configMapRef": {"name": "kaiyuan-object-store"}} in container["envFrom"]
    # Ray: join the cluster as a zero-CPU node, driver connects with auto.
    assert env["RAY_ADDRESS"]["value"] == "auto"
    assert env["KAIYUAN_RAY_JOIN"]["value"] == "1"
    assert env["KAIYUAN_RAY_HEAD"]["value"] == "kaiyuan-ray-head-svc.kaiyuan.svc.cluster.local:6379"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "kaiyuan-ray-auth", "key": "auth_token"}
    # The worker's own auth string never lands in the Job.
    assert WORKER_ENV["PREFECT_API_AUTH_STRING"] not in json.dumps(manifest)


def test_work_pool_template_ray_client_fallback_and_overrides():
    values = {
        "image": "registry.example.com/kaiyuan-flows:1.2.3",
        "ray_address": "ray://kaiyuan-ray-head-svc.kaiyuan.svc.cluster.local:10001",
        "ray_join": "0",
        "finished_job_ttl": 3600,
        "memory_limit": "8Gi",
    }
    manifest = _render(values, WORKER_ENV)
    _validate_job(manifest)
    env = _env(manifest)
    assert env["RAY_ADDRESS"]["value"] == values["ray_address"]
    assert env["KAIYUAN_RAY_JOIN"]["value"] == "0"
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3600
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == values["image"]
    assert container["resources"]["limits"]["memory"] == "8Gi"


def test_work_pool_template_variables_schema_accepts_defaults():
    template = json.loads(TEMPLATE.read_text())
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables["properties"]), placeholders - set(variables["properties"])


# ------------------------------------------------------------------ image and Makefile


def test_dockerfile_is_multistage_small_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\w+))?", text, re.M)
    assert len(stages) >= 2, "multi-stage build"
    assert re.search(r"^FROM .*-slim", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "COPY --from=build /opt/venv /opt/venv" in text
    assert "WORKDIR /opt/kaiyuan" in text  # deployments/generate.py: K8S_WORKDIR
    assert "/usr/local/bin/kaiyuan-entrypoint" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", "data", "tests", ".venv"):
        assert entry in ignore


def test_entrypoint_script_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(K8S / "image" / "entrypoint.sh")], check=True)


MAKE_TARGETS = [
    "build", "prepare-sample", "run", "run-examples",
    "k8s-up", "k8s-prepare", "k8s-deploy", "k8s-run", "k8s-run-examples", "k8s-ui", "k8s-history", "k8s-down",
]


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_make_target_dry_run(target):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = subprocess.run([make, "-n", target], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_make_k8s_up_applies_every_manifest_directory():
    text = (ROOT / "Makefile").read_text()
    for path in sorted({p.parent.relative_to(ROOT).as_posix() for p in yaml_files()}):
        if path in ("k8s/kind", "k8s/ray", "k8s/prefect") or path.startswith("k8s/schemas"):
            continue
        assert path in text, f"Makefile never applies {path}"
    for needed in (
        "k8s/kind/cluster.yaml", "k8s/ray/raycluster.yaml", "k8s/ray/kuberay-operator-values.yaml", "k8s/minio/bucket-init.yaml",
        "k8s/prefect/server-values.yaml", "k8s/prefect/worker-values.yaml",
    ):
        assert needed in text
