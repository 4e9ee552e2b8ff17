#!/usr/bin/env bash
# Entry point of the kaiyuan-flows image.
#
# In a flow-run pod (KAIYUAN_RAY_JOIN=1, set by k8s/base-job-template.json)
# the pod first joins the RayCluster as a zero-CPU Ray node, so the flow's
# Ray driver runs *inside* the cluster and connects with RAY_ADDRESS=auto, as
# prefect-ray recommends (a ray:// client connection does not survive network
# blips). Tasks never land on this node (no CPUs); it only hosts the driver
# and its share of the object store. Then the command runs (for flow runs:
# `prefect flow-run execute`), SIGTERM is forwarded to it, and the Ray node
# is stopped when it ends. Anything else (the Prefect server and worker,
# `python flows/run.py ...`) just runs the command.
set -euo pipefail

if [[ "${KAIYUAN_RAY_JOIN:-0}" == "1" && -n "${KAIYUAN_RAY_HEAD:-}" ]]; then
  args=(--address="${KAIYUAN_RAY_HEAD}" --num-cpus=0 --num-gpus=0 --disable-usage-stats)
  [[ -n "${POD_IP:-}" ]] && args+=(--node-ip-address="${POD_IP}")
  [[ -n "${KAIYUAN_RAY_OBJECT_STORE_BYTES:-}" ]] && args+=(--object-store-memory="${KAIYUAN_RAY_OBJECT_STORE_BYTES}")
  joined=0
  for attempt in $(seq 1 "${KAIYUAN_RAY_JOIN_ATTEMPTS:-30}"); do
    if ray start "${args[@]}"; then joined=1; break; fi
    echo "kaiyuan-entrypoint: Ray head ${KAIYUAN_RAY_HEAD} not reachable yet (attempt ${attempt}); retrying in 5 s" >&2
    sleep 5
  done
  if [[ "${joined}" != "1" ]]; then
    echo "kaiyuan-entrypoint: could not join the Ray cluster at ${KAIYUAN_RAY_HEAD}; see k8s/README.md, Troubleshooting" >&2
    exit 1
  fi
  export RAY_ADDRESS="${RAY_ADDRESS:-auto}"
  "$@" &
  child=$!
  trap 'kill -TERM "${child}" 2>/dev/null || true' TERM INT
  set +e
  wait "${child}"; rc=$?
  while kill -0 "${child}" 2>/dev/null; do wait "${child}"; rc=$?; done
  set -e
  ray stop --force >/dev/null 2>&1 || true
  exit "${rc}"
fi

exec "$@"
