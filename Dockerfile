# syntax=docker/dockerfile:1.7
# kaiyuan-flows image: Ray + Prefect + the project (+ optional extras).
# One image for the Prefect server and worker, the flow-run pods and the
# Ray head/worker pods, so every Ray and Python version matches.
#
#   make build                                   # docker build -t kaiyuan-flows:latest .
#   docker build --build-arg EXTRAS=minhash,cluster,models -t kaiyuan-flows:latest .
#
# Stage 1 builds a virtual environment with a compiler-free pip install;
# stage 2 copies only that environment and the sources onto a slim base and
# runs as an unprivileged user (uid 1000, as the k8s/ manifests expect).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# Comma-separated optional-dependency groups of pyproject.toml: the cluster
# image runs MinHash and the Kubernetes worker (add models for model nodes).
ARG EXTRAS="minhash,cluster"
# CPU-only torch wheels when an extra needs torch (the default index serves
# multi-GB CUDA builds).
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY flows ./flows
COPY tasks ./tasks
COPY blocks ./blocks
COPY deployments ./deployments
COPY samples ./samples
RUN pip install --upgrade pip \
 && if [ -n "${EXTRAS}" ]; then pip install ".[${EXTRAS}]"; else pip install .; fi \
 && find /opt/venv -depth -name '__pycache__' -type d -exec rm -rf {} + \
 && find /opt/venv -name '*.pyc' -delete

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# wget: KubeRay's health probes call it in the Ray containers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 kaiyuan \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash kaiyuan
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/kaiyuan
# Sources next to the installed package: k8s deployments set their working
# directory to /opt/kaiyuan (deployments/generate.py, K8S_WORKDIR) and use the
# entrypoint flows/pipeline.py:kaiyuan_pipeline and examples/*.yaml from here.
COPY --chown=1000:1000 pyproject.toml ./
COPY --chown=1000:1000 flows ./flows
COPY --chown=1000:1000 tasks ./tasks
COPY --chown=1000:1000 blocks ./blocks
COPY --chown=1000:1000 deployments ./deployments
COPY --chown=1000:1000 samples ./samples
COPY --chown=1000:1000 examples ./examples
COPY --chmod=0755 k8s/image/entrypoint.sh /usr/local/bin/kaiyuan-entrypoint
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/kaiyuan \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_HOME=/tmp/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    RAY_USAGE_STATS_ENABLED=0
USER 1000:1000
# MinHash's numba kernels compiled once here, not in every Ray worker of every
# run (about 20 s each): cached in a directory the pods can write (numba
# refuses a read-only cache), for both import paths a worker may use (the
# installed package, and the sources under /opt/kaiyuan).
ENV KAIYUAN_KERNEL_CACHE=/home/kaiyuan/.cache/kaiyuan/kernels
RUN if python -c "import numba" 2>/dev/null; then \
      (cd / && python -m tasks._minhash_kernels) && python -m tasks._minhash_kernels; \
    fi
ENTRYPOINT ["/usr/local/bin/kaiyuan-entrypoint"]
CMD ["python", "flows/run.py", "--help"]
