#!/usr/bin/env bash
# CI stage: build the BIDS-App image (containers/Dockerfile) with podman and run it.
#
# No registry can be pulled from, so the Debian base image is made here (debootstrap,
# minbase) and tagged with the name the Dockerfile's FROM uses: the same Dockerfile
# builds unchanged on a normal Docker host. Then: `--help` and `--version` in the image,
# the demo subject processed inside it with the input mounted read-only and no network,
# and the image size (must stay within 1.5 GB). Containers, images and the scratch
# folder made here are removed on exit, also on failure.
#
# Usage: container_stage.sh [all|build|check|clean]. `build` makes the base and the image
# and keeps them in $CST_CONTAINER_SCRATCH (removed only on failure); `check` runs the
# image built there, then removes everything; `clean` only removes it. .ci/run builds
# while the tests run: the build mostly downloads and unpacks, beside the tests' computing.
#
# Environment: PYTHON (default .venv/bin/python; writes the demo dataset),
# CST_CONTAINER_SCRATCH (the scratch folder; required by build, check and clean).
set -euo pipefail
cd "$(dirname "$0")/.."
stage_start=$(date +%s)
PHASE=${1:-all}
case "$PHASE" in
  all) SCRATCH=$(mktemp -d /tmp/cst-container-stage.XXXXXX) ;;
  build | check | clean)
    SCRATCH=${CST_CONTAINER_SCRATCH:?set CST_CONTAINER_SCRATCH for the $PHASE phase}
    mkdir -p "$SCRATCH" ;;
  *) echo "usage: $0 [all|build|check|clean]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=localhost/cst-integrity:ci
BASE=docker.io/library/debian:bookworm-slim  # the Dockerfile's FROM
MAX_IMAGE_BYTES=1500000000

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v runc >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman debootstrap runc >/dev/null
fi

# Own storage (flags, not CONTAINERS_STORAGE_CONF: that made runs hang); runc because crun
# fails on hosts with hybrid cgroups; ulimits because setrlimit is not permitted there.
podman_() {
  podman --root "$SCRATCH"/storage --runroot "$SCRATCH"/runroot --runtime runc \
    --events-backend file --cgroup-manager cgroupfs "$@"
}
RUN_OPTIONS=(--rm --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

cleanup() {
  local status=$?
  # A successful build leaves the image for the check phase.
  [ "$PHASE" = build ] && [ "$status" -eq 0 ] && exit 0
  set +e
  [ "$status" -ne 0 ] && echo "container stage ($PHASE) FAILED (exit $status)" >&2
  podman_ rm --all --force >/dev/null 2>&1
  # also releases the storage's own mounts, so that the folder can be removed
  podman_ system reset --force >/dev/null 2>&1
  findmnt -rn -o TARGET | grep "^$SCRATCH/" | sort -r | xargs -r umount -l
  rm -rf "$SCRATCH"
  echo "container stage: containers and images removed, scratch removed"
  exit "$status"
}
trap cleanup EXIT

timed() {  # timed LABEL COMMAND...: run, print its wall time
  local label=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  echo "container stage: $label took $(( $(date +%s) - t0 )) s"
}

debian_mirror() {  # the Debian mirror apt uses on this machine
  local mirror
  mirror=$(sed -n 's|^URIs: *\(\S*\).*|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v security | head -n 1)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' \
    /etc/apt/sources.list 2>/dev/null)
  echo "${mirror:-http://deb.debian.org/debian}"
}

make_base_image() {
  debootstrap --variant=minbase bookworm "$SCRATCH"/rootfs "$(debian_mirror)" \
    >"$SCRATCH"/debootstrap.log 2>&1 || { tail -n 20 "$SCRATCH"/debootstrap.log >&2; return 1; }
  tar -C "$SCRATCH"/rootfs -c . | podman_ import - "$BASE" >/dev/null
  rm -rf "$SCRATCH"/rootfs
}

build_image() {
  # pip in the build verifies PyPI with the host's CA bundle, mounted for the build only
  podman_ build --isolation chroot --network host --pull=never \
    -v /etc/ssl/certs/ca-certificates.crt:/run/pip-ca.crt:ro \
    --build-arg PIP_CERT=/run/pip-ca.crt \
    --build-arg VCS_REF="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -f containers/Dockerfile -t "$IMAGE" . >"$SCRATCH"/build.log 2>&1 \
    || { tail -n 40 "$SCRATCH"/build.log >&2; return 1; }
}

run_demo() {
  "$PYTHON" scripts/make_demo_dataset.py "$SCRATCH"/demo/bids >/dev/null
  chmod -R a-w "$SCRATCH"/demo/bids
  find "$SCRATCH"/demo/bids -type f -exec sha256sum {} + | sort >"$SCRATCH"/inputs.sha256
  mkdir -p "$SCRATCH"/demo/out
  chown 1000:1000 "$SCRATCH"/demo/out  # the image's non-root user writes the outputs
  local code=0
  podman_ run "${RUN_OPTIONS[@]}" --network none \
    -v "$SCRATCH"/demo/bids:/data:ro -v "$SCRATCH"/demo/out:/out \
    "$IMAGE" /data /out participant --n-jobs 2 || code=$?
  [ "$code" -eq 0 ]
  test -s "$SCRATCH"/demo/out/sub-subject01.html
  test -s "$SCRATCH"/demo/out/sub-subject01/dwi/sub-subject01_desc-cst_metrics.json
  [ "$(stat -c %u "$SCRATCH"/demo/out/sub-subject01.html)" = 1000 ]  # not root
  find "$SCRATCH"/demo/bids -type f -exec sha256sum {} + | sort | cmp - "$SCRATCH"/inputs.sha256
}

show_help_and_version() {
  local help
  help=$(podman_ run "${RUN_OPTIONS[@]}" "$IMAGE" --help)
  sed -n 1,2p <<<"$help"
  grep -q -- "--plugin" <<<"$help"
  podman_ run "${RUN_OPTIONS[@]}" "$IMAGE" --version
}

[ "$PHASE" = clean ] && exit 0  # the exit trap removes it all
if [ "$PHASE" != check ]; then
  timed "base image (debootstrap)" make_base_image
  timed "image build" build_image
fi
if [ "$PHASE" = build ]; then
  echo "container stage: image built in $(( $(date +%s) - stage_start )) s"
  exit 0
fi
timed "--help and --version" show_help_and_version
[ "$(podman_ image inspect "$IMAGE" --format '{{.Config.User}}')" = cst ]
timed "demo inside the image (input read-only, no network)" run_demo

size=$(podman_ image inspect "$IMAGE" --format '{{.Size}}')
echo "container stage: image size $(( size / 1000000 )) MB (goal <= $(( MAX_IMAGE_BYTES / 1000000 )) MB)"
[ "$size" -le "$MAX_IMAGE_BYTES" ]
echo "container stage ($PHASE) finished in $(( $(date +%s) - stage_start )) s"
