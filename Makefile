# Kaiyuan Flows: local runs and the Kubernetes (kind + KubeRay) cluster path.
# The cluster walkthrough and troubleshooting are in k8s/README.md.
#
#   make run CONFIG=examples/read_write.yaml       local Ray, local files
#   make up / make down                            warm mode: Ray and a Prefect server stay up
#   make k8s-up k8s-prepare k8s-deploy k8s-run     the same recipe on a cluster

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON          ?= python
IMAGE           ?= kaiyuan-flows:latest
EXTRAS          ?= minhash,cluster
CONFIG          ?= examples/read_write.yaml
CLUSTER         ?= kaiyuan
NS              ?= kaiyuan
KUBECTL         ?= kubectl
KUBERAY_VERSION ?= 1.6.2
# Prefect's official charts (https://prefecthq.github.io/prefect-helm), released together;
# they run our image, so the chart's own appVersion does not matter (Prefect 3.9 in the image)
PREFECT_CHART_VERSION ?= 2026.9.3212605
# 1: apply k8s/dev-secrets (throwaway local credentials); 0: you created the Secrets yourself
K8S_DEV_SECRETS ?= 1
# The Prefect API as seen from this machine (kind NodePort mapping; or run `make k8s-ui` for port-forwards)
K8S_PREFECT_API ?= http://localhost:4200/api
# MinIO's S3 API as seen from this machine (kind NodePort mapping)
K8S_S3_ENDPOINT ?= http://localhost:9000
DEPLOYMENT      ?= read-write-k8s
FLOW            ?= kaiyuan-pipeline
# Set to run the deployment with another recipe from the image, e.g. K8S_CONFIG=examples/vis.yaml
K8S_CONFIG      ?=
WAIT            ?= 300s

K := $(KUBECTL) -n $(NS)
# Credentials are read from the cluster's Secrets when a target needs them,
# never stored in this file.
secret = $$($(K) get secret $(1) -o jsonpath='{.data.$(2)}' | base64 -d)
PREFECT_ENV = PREFECT_API_URL=$(K8S_PREFECT_API) PREFECT_API_AUTH_STRING="$(call secret,prefect-auth,auth-string)"

.PHONY: help build prepare-sample run up down run-examples cluster-sim \
        k8s-up k8s-prepare k8s-deploy k8s-run k8s-run-examples k8s-ui k8s-history k8s-down

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# ---------------------------------------------------------------- local
build: ## build the image (Dockerfile; EXTRAS=a,b for optional dependency groups)
	docker build --build-arg EXTRAS="$(EXTRAS)" -t $(IMAGE) .

prepare-sample: ## generate data/sample (datasets, and the small sample models under data/sample/models)
	$(PYTHON) -m samples.data

run: ## run one recipe locally: make run CONFIG=examples/read_write.yaml
	$(PYTHON) flows/run.py --config $(CONFIG)

up: ## warm mode: keep a Prefect server (UI at :4200), a Ray head and the warm runner up; runs take ~2.6 s
	$(PYTHON) -m flows.services up

down: ## stop what `make up` started
	$(PYTHON) -m flows.services down

run-examples: ## run every examples/*.yaml locally
	for f in examples/*.yaml; do echo "== $$f"; $(PYTHON) flows/run.py --config "$$f"; done

cluster-sim: ## rehearse the cluster on this machine: Ray pods sharing only S3 (root; see k8s/README.md)
	$(PYTHON) -m tests.cluster_sim up

# ---------------------------------------------------------------- cluster
k8s-up: build ## kind cluster + MinIO + PostgreSQL + Prefect server/worker (Helm) + KubeRay (Helm) + RayCluster
	if ! kind get clusters | grep -qx '$(CLUSTER)'; then kind create cluster --name $(CLUSTER) --config k8s/kind/cluster.yaml; fi
	kind load docker-image $(IMAGE) --name $(CLUSTER)
	$(KUBECTL) apply -f k8s/namespace/
	$(KUBECTL) apply -f k8s/rbac/
	if [ "$(K8S_DEV_SECRETS)" = 1 ]; then $(KUBECTL) apply -f k8s/dev-secrets/; fi
	$(KUBECTL) apply -f k8s/minio/minio.yaml -f k8s/minio/object-store-config.yaml -f k8s/postgres/
	$(K) rollout status deployment/minio --timeout=$(WAIT)
	$(K) delete job minio-bucket-init --ignore-not-found
	$(KUBECTL) apply -f k8s/minio/bucket-init.yaml
	$(K) wait --for=condition=complete job/minio-bucket-init --timeout=$(WAIT)
	$(K) rollout status deployment/postgres --timeout=$(WAIT)
	helm repo add prefect https://prefecthq.github.io/prefect-helm --force-update
	helm upgrade --install prefect-server prefect/prefect-server --version $(PREFECT_CHART_VERSION) \
	  -n $(NS) -f k8s/prefect/server-values.yaml --wait --timeout $(WAIT)
	helm upgrade --install prefect-worker prefect/prefect-worker --version $(PREFECT_CHART_VERSION) \
	  -n $(NS) -f k8s/prefect/worker-values.yaml \
	  --set-file worker.config.baseJobTemplate.configuration=k8s/base-job-template.json --wait --timeout $(WAIT)
	$(K) rollout status deployment/prefect-server --timeout=$(WAIT)
	$(K) rollout status deployment/prefect-worker --timeout=$(WAIT)
	helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
	helm upgrade --install kuberay-operator kuberay/kuberay-operator --version $(KUBERAY_VERSION) \
	  -n $(NS) -f k8s/ray/kuberay-operator-values.yaml --wait --timeout $(WAIT)
	$(KUBECTL) apply -f k8s/ray/raycluster.yaml
	for i in $$(seq 1 60); do $(K) get pod -l ray.io/cluster=kaiyuan-ray,ray.io/node-type=head -o name | grep -q . && break; sleep 5; done
	$(K) wait --for=condition=Ready pod -l ray.io/cluster=kaiyuan-ray,ray.io/node-type=head --timeout=$(WAIT)
	@echo "cluster up; next: make k8s-prepare k8s-deploy k8s-run  (URLs: make k8s-ui)"

k8s-prepare: prepare-sample ## upload data/sample (with its models) and data/models if present to MinIO (s3://kaiyuan-ray/...)
	AWS_ENDPOINT_URL=$(K8S_S3_ENDPOINT) AWS_REGION=us-east-1 LANCE_AWS_ALLOW_HTTP=true \
	K8S_DATA_BUCKET="$$($(K) get configmap kaiyuan-object-store -o jsonpath='{.data.K8S_DATA_BUCKET}')" \
	AWS_ACCESS_KEY_ID="$(call secret,kaiyuan-object-store,AWS_ACCESS_KEY_ID)" \
	AWS_SECRET_ACCESS_KEY="$(call secret,kaiyuan-object-store,AWS_SECRET_ACCESS_KEY)" \
	  $(PYTHON) -m deployments.upload data/sample $$( [ -d data/models ] && echo data/models )

k8s-deploy: ## work pools (kaiyuan-k8s with k8s/base-job-template.json), block types, deployments
	$(PREFECT_ENV) $(PYTHON) -m deployments.setup

k8s-run: ## run a deployment on the cluster and follow it: make k8s-run DEPLOYMENT=read-write-k8s [K8S_CONFIG=examples/vis.yaml]
	$(PREFECT_ENV) prefect deployment run '$(FLOW)/$(DEPLOYMENT)' --watch \
	  $(if $(K8S_CONFIG),--param config=$(K8S_CONFIG),)

k8s-run-examples: ## run every example's -k8s deployment, one after the other
	for f in examples/*.yaml; do \
	  name="$$(basename "$$f" .yaml | tr _ -)-k8s"; echo "== $$name"; \
	  $(PREFECT_ENV) prefect deployment run "$(FLOW)/$$name" --watch; \
	done

k8s-ui: ## print the Prefect UI and Ray dashboard URLs (and port-forward commands)
	@echo "Prefect UI:      http://localhost:4200   (kind NodePort 30420; user/password: kubectl -n $(NS) get secret prefect-auth -o jsonpath='{.data.auth-string}' | base64 -d)"
	@echo "Ray dashboard:   http://localhost:8265   (kind NodePort 30265)"
	@echo "MinIO S3 API:    $(K8S_S3_ENDPOINT)   (kind NodePort 30900)"
	@echo "Without the kind port mappings (other clusters):"
	@echo "  $(K) port-forward svc/prefect-server 4200:4200"
	@echo "  $(K) port-forward svc/kaiyuan-ray-head-svc 8265:8265"
	@echo "  $(K) port-forward svc/minio 9000:9000 9001:9001   # console on :9001"

k8s-history: ## recent flow runs (Prefect) next to the flow-run Jobs still kept by Kubernetes
	COLUMNS=200 $(PREFECT_ENV) prefect flow-run ls --limit 20
	$(K) get jobs -l prefect.io/flow-run-id --sort-by=.metadata.creationTimestamp \
	  -o custom-columns='JOB:.metadata.name,FLOW_RUN:.metadata.labels.prefect\.io/flow-run-name,SUCCEEDED:.status.succeeded,FAILED:.status.failed,COMPLETED:.status.completionTime'

k8s-down: ## delete the kind cluster (and everything in it, volumes included)
	kind delete cluster --name $(CLUSTER)
