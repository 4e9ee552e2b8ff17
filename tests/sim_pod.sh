#!/usr/bin/env bash
# The inside of a simulated pod (tests/cluster_sim.py), run by
#   unshare --mount --propagation private --pid --fork --mount-proc bash tests/sim_pod.sh CMD...
# The root filesystem (checkout, venv, everything) becomes read-only, /tmp
# and /dev/shm private tmpfs, $HOME=/tmp/home; KAIYUAN_POD_VOLUME (a host
# directory, like a pod's volume) is mounted at /tmp/volume. POD_IP defaults
# to a free-looking loopback address.
set -euo pipefail
volume="${KAIYUAN_POD_VOLUME:-}"
mount -t tmpfs -o mode=1777 pod-tmp /tmp
mount -t tmpfs -o mode=1777 pod-shm /dev/shm
mkdir -p /tmp/home
if [[ -n "${volume}" ]]; then  # before the root turns read-only: a bind copies its source's flags
  mkdir -p /tmp/volume
  mount --bind "${volume}" /tmp/volume
fi
mount -o remount,bind,ro /
export HOME=/tmp/home
export POD_IP="${POD_IP:-127.0.$((RANDOM % 200 + 50)).$((RANDOM % 200 + 20))}"
cd "${KAIYUAN_POD_CWD:-$(dirname "$0")/..}"
exec "$@"
