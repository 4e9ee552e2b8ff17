#!/usr/bin/env bash
# The inside of a simulated pod (tests/cluster_sim.py), run by
#   unshare --mount --propagation private --pid --fork --mount-proc bash tests/sim_pod.sh CMD...
# The root filesystem (checkout, venv, everything) becomes read-only, /tmp
# and /dev/shm private tmpfs, $HOME=/tmp/home; KAIYUAN_POD_VOLUME (a host
# directory, like a pod's volume) is mounted at /tmp/volume. POD_IP defaults
# to a free-looking loopback address. A checkout under /tmp stays visible
# (read-only) at its path, as the image's code is in a pod.
set -euo pipefail
volume="${KAIYUAN_POD_VOLUME:-}"
cwd="${KAIYUAN_POD_CWD:-$(cd "$(dirname "$0")/.." && pwd)}"
under_tmp=0
if [[ "${cwd}" == /tmp/* ]]; then  # keep the host's /tmp reachable while the pod's hides it
  under_tmp=1
  mount --bind /tmp /mnt
fi
mount -t tmpfs -o mode=1777 pod-tmp /tmp
mount -t tmpfs -o mode=1777 pod-shm /dev/shm
mkdir -p /tmp/home
if [[ "${under_tmp}" == 1 ]]; then
  mkdir -p "${cwd}"
  mount --bind "/mnt${cwd#/tmp}" "${cwd}"
  mount -o remount,bind,ro "${cwd}"
fi
if [[ -n "${volume}" ]]; then  # before the root turns read-only: a bind copies its source's flags
  mkdir -p /tmp/volume
  mount --bind "${volume}" /tmp/volume
fi
[[ "${under_tmp}" == 1 ]] && umount -l /mnt
mount -o remount,bind,ro /
export HOME=/tmp/home
export POD_IP="${POD_IP:-127.0.$((RANDOM % 200 + 50)).$((RANDOM % 200 + 20))}"
cd "${cwd}"
exec "$@"
