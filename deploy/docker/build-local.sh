#!/usr/bin/env bash
# Build and smoke-test the CPU image on a machine without Docker and without access to a container
# registry: Debian's buildah and podman (rootful, vfs storage, chroot isolation, host network).
#
#   sudo deploy/docker/build-local.sh            # all steps: base, build, run
#   sudo deploy/docker/build-local.sh base       # only the local stand-in for python:3.11-slim-bookworm
#   sudo deploy/docker/build-local.sh build      # only `buildah bud` of the Dockerfile (base must exist)
#   sudo deploy/docker/build-local.sh api        # only `buildah bud --target api` (base must exist)
#   sudo deploy/docker/build-local.sh run        # only the smoke run of the built image
#   sudo deploy/docker/build-local.sh clean      # delete BUILD_DIR (images, root file system, logs)
#
# 1. base:  `debootstrap --variant=minbase bookworm` + Debian's python3 (3.11), laid out like the
#           official python:3.11-slim-bookworm image for what our Dockerfile uses (python, python3,
#           pip in /usr/local/bin, `python -m venv`, groupadd/useradd), committed as $BASE_IMAGE.
# 2. build: `buildah bud` of the repository's Dockerfile, unchanged, with --build-arg
#           PYTHON_IMAGE=$BASE_IMAGE; where download.pytorch.org is unreachable, torch comes from a
#           local copy of its wheel index (--build-arg TORCH_INDEX_MIRROR=http://127.0.0.1:PORT/simple).
#           Then its `api` target (the API replicas' image, no torch) as $API_IMAGE.
# 3. run:   podman runs the image as Kubernetes runs it (user 10001, read-only root, /tmp and
#           /models writable, all capabilities dropped) and checks from outside: the API alone
#           (/readyz, POST /generate -> PNG, /metrics, the image's HEALTHCHECK), then the scale-out
#           pair against a redis-server on the host (appendonly yes, as compose and Kubernetes
#           run it): a worker container and an API container ($API_IMAGE: no torch in it) on the
#           Redis queue, one generation through them. Prints each step, the build time, the time to
#           ready and the image sizes.
#
# Environment: BUILD_DIR (/var/tmp/fastcache-build: container storage, root file system, logs; never
# inside the repository), IMAGE (fastcache-serve:cpu), API_IMAGE (fastcache-serve:api), BASE_IMAGE (localhost/python-local:3.11-slim-bookworm),
# DEBIAN_MIRROR (debootstrap's default), TORCH_INDEX_MIRROR (use this torch wheel index),
# TORCH_WHEELS (a directory with the torch wheel for the local index, default /opt/wheels),
# READY_TIMEOUT (600 s), HOST_CA_DIR (/usr/local/share/ca-certificates: local CA certificates that the
# base trusts too, for TLS-inspecting proxies; empty: none). Needs root (debootstrap, rootful
# buildah/podman); apt-installs buildah, debootstrap, podman and redis-server when missing. The CUDA
# variant is not built here.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD_DIR="${BUILD_DIR:-/var/tmp/fastcache-build}"
IMAGE="${IMAGE:-fastcache-serve:cpu}"
API_IMAGE="${API_IMAGE:-fastcache-serve:api}"
BASE_IMAGE="${BASE_IMAGE:-localhost/python-local:3.11-slim-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-}"
TORCH_WHEELS="${TORCH_WHEELS:-/opt/wheels}"
READY_TIMEOUT="${READY_TIMEOUT:-600}"
HOST_CA_DIR="${HOST_CA_DIR-/usr/local/share/ca-certificates}"
SMOKE="$REPO/deploy/docker/smoke.py"
HOST_PYTHON="${HOST_PYTHON:-$(command -v python3)}"
STORAGE=(--root "$BUILD_DIR/storage" --runroot "$BUILD_DIR/run" --storage-driver vfs)
BUILDAH=(buildah "${STORAGE[@]}")
# runc: crun refuses hosts with hybrid cgroups (v1 controllers plus a v2 mount with controllers);
# cgroupfs and a file event log: no systemd needed
PODMAN=(podman "${STORAGE[@]}" --runtime runc --cgroup-manager cgroupfs --events-backend file)
RUN_ID="fastcache-smoke-$$"

case "$BUILD_DIR" in "$REPO"|"$REPO"/*) echo "BUILD_DIR must be outside the repository" >&2; exit 2 ;; esac

T0=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
free_port() { "$HOST_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
human() { numfmt --to=iec-i --suffix=B "$1"; }

need_tools() {
  [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and rootful buildah/podman): sudo $0 $*"
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v redis-server >/dev/null || missing+=(redis-server)
  if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true
  fi
  mkdir -p "$BUILD_DIR/logs"
}

# ------------------------------------------------------------------------------------------- base
base() {
  local rootfs="$BUILD_DIR/rootfs" context="$BUILD_DIR/base"
  step "base image $BASE_IMAGE: debootstrap --variant=minbase bookworm + python3.11"
  rm -rf "$rootfs" "$context"
  mkdir -p "$context"
  local start=$SECONDS
  # python3-venv: `python -m venv` (ensurepip), which the official image supports out of the box;
  # netbase, tzdata and ca-certificates are in the official slim image too
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,netbase,tzdata \
    bookworm "$rootfs" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >"$BUILD_DIR/logs/debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $BUILD_DIR/logs/debootstrap.log"
  info "debootstrap: $((SECONDS - start)) s"
  # The official image: Python under /usr/local/bin (python, python3, pip), no PEP 668 marker
  # (pip may install into the system Python), slim: no docs, man pages or locales; apt lists and
  # downloaded packages removed. apt sources: bookworm main, as debootstrap writes them.
  ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3.11"
  ln -sf python3.11 "$rootfs/usr/local/bin/python3"
  ln -sf python3.11 "$rootfs/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip3"
  ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
  rm -f "$rootfs"/usr/lib/python3.11/EXTERNALLY-MANAGED
  # A machine behind a TLS-inspecting proxy trusts its CA through /usr/local/share/ca-certificates:
  # the base trusts the same certificates (system store, and pip's, which otherwise uses its own
  # bundle), or nothing can be downloaded during the build. No such certificates: nothing changes.
  local cas=()
  [ -n "$HOST_CA_DIR" ] && cas=("$HOST_CA_DIR"/*.crt)
  if [ ${#cas[@]} -gt 0 ] && [ -f "${cas[0]}" ]; then
    cp "${cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >"$BUILD_DIR/logs/update-ca-certificates.log" 2>&1
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    info "trusts the host's ${#cas[@]} local CA certificate(s) from $HOST_CA_DIR (pip too, via /etc/pip.conf)"
  fi
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
  : >"$rootfs/etc/resolv.conf"
  : >"$rootfs/etc/hostname"
  local version
  version=$(chroot "$rootfs" /usr/local/bin/python -c 'import platform; print(platform.python_version())')
  # what the Dockerfile's builder does first: a virtualenv with pip (ensurepip)
  if ! { chroot "$rootfs" /usr/local/bin/python -m venv /tmp/venv-check >/dev/null \
         && chroot "$rootfs" /tmp/venv-check/bin/pip --version >/dev/null; }; then
    die "python -m venv does not give a working pip in the base"
  fi
  rm -rf "$rootfs/tmp/venv-check"
  tar -C "$rootfs" --numeric-owner -cf "$context/rootfs.tar" .
  info "root file system: $(du -sh --apparent-size "$rootfs" | cut -f1), Python $version"
  cat >"$context/Containerfile" <<EOF
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8 \\
    PYTHON_VERSION=$version
LABEL org.opencontainers.image.description="local stand-in for python:3.11-slim-bookworm: debootstrap minbase + Debian python3 $version"
CMD ["python3"]
EOF
  "${BUILDAH[@]}" bud --isolation chroot --format docker --quiet -t "$BASE_IMAGE" "$context" >/dev/null
  rm -f "$context/rootfs.tar"
  info "committed $BASE_IMAGE: $(human "$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$BASE_IMAGE")")"
}

# ------------------------------------------------------------------------------------- torch index
# Sets TORCH_INDEX_ARGS, the --build-arg for the torch wheel index: none where download.pytorch.org
# answers, else a local PEP 503 index (torch from $TORCH_WHEELS, its dependencies from PyPI) served
# on 127.0.0.1 while the build runs.
TORCH_INDEX_PID=""
TORCH_INDEX_ARGS=()
torch_index() {
  if [ -n "${TORCH_INDEX_MIRROR:-}" ]; then
    TORCH_INDEX_ARGS=(--build-arg "TORCH_INDEX_MIRROR=$TORCH_INDEX_MIRROR")
    return
  fi
  if curl -sfI -m 15 https://download.pytorch.org/whl/cpu/torch/ >/dev/null 2>&1; then
    return
  fi
  local version index="$BUILD_DIR/torch-index"
  version=$(sed -n 's/^ARG TORCH_VERSION=//p' "$REPO/Dockerfile")
  info "download.pytorch.org is unreachable: a local wheel index of torch==$version+cpu (from $TORCH_WHEELS) and its dependencies (PyPI)"
  rm -rf "$index" && mkdir -p "$index/files"
  "$HOST_PYTHON" -m pip download -q --only-binary=:all: --find-links "$TORCH_WHEELS" \
    --dest "$index/files" "torch==$version+cpu" >"$BUILD_DIR/logs/torch-index.log" 2>&1 \
    || die "pip download torch==$version+cpu failed (see $BUILD_DIR/logs/torch-index.log); set TORCH_WHEELS or TORCH_INDEX_MIRROR"
  "$HOST_PYTHON" - "$index" <<'EOF'
import hashlib, html, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
projects = {}
for wheel in sorted((root / "files").iterdir()):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel)
for name, wheels in projects.items():
    page = root / "simple" / name / "index.html"
    page.parent.mkdir(parents=True)
    links = "".join(f'<a href="../../files/{html.escape(w.name)}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                    f"{html.escape(w.name)}</a>\n" for w in wheels)
    page.write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
EOF
  local port
  port=$(free_port)
  "$HOST_PYTHON" -m http.server --bind 127.0.0.1 --directory "$index" "$port" >"$BUILD_DIR/logs/torch-index-http.log" 2>&1 &
  TORCH_INDEX_PID=$!
  TORCH_INDEX_ARGS=(--build-arg "TORCH_INDEX_MIRROR=http://127.0.0.1:$port/simple")
  info "serving $(find "$index/files" -name '*.whl' | wc -l) wheels at http://127.0.0.1:$port/simple"
}

# ------------------------------------------------------------------------------------------ build
build() {
  "${PODMAN[@]}" image exists "$BASE_IMAGE" || die "no base image $BASE_IMAGE: run '$0 base' first"
  step "torch wheel index"
  torch_index
  if [ ${#TORCH_INDEX_ARGS[@]} -eq 0 ]; then info "download.pytorch.org (the Dockerfile's default)"; else info "${TORCH_INDEX_ARGS[*]}"; fi
  step "buildah bud $IMAGE from $REPO/Dockerfile (VARIANT=cpu, PYTHON_IMAGE=$BASE_IMAGE); log: $BUILD_DIR/logs/build.log"
  local start=$SECONDS
  # --format docker: OCI image configs have no HEALTHCHECK; Docker's format keeps it. No --layers:
  # with vfs every cached layer is a full copy of the file system (tens of GB for this Dockerfile)
  if ! "${BUILDAH[@]}" bud --isolation chroot --network host --format docker --pull=false \
      --build-arg VARIANT=cpu --build-arg PYTHON_IMAGE="$BASE_IMAGE" "${TORCH_INDEX_ARGS[@]}" \
      -f "$REPO/Dockerfile" -t "$IMAGE" "$REPO" >"$BUILD_DIR/logs/build.log" 2>&1; then
    tail -n 30 "$BUILD_DIR/logs/build.log" >&2
    die "buildah bud failed, see $BUILD_DIR/logs/build.log"
  fi
  BUILD_SECONDS=$((SECONDS - start))
  stop_torch_index
  { grep -E '^\[[0-9]+/[0-9]+\] STEP [0-9]+/' "$BUILD_DIR/logs/build.log" || true; } | sed 's/^/    /' | cut -c1-150
  info "built $IMAGE in ${BUILD_SECONDS} s: $(human "$(image_size)") (uncompressed)"
  echo "$BUILD_SECONDS" >"$BUILD_DIR/build-seconds"
  build_api
}

build_api() {
  step "buildah bud --target api $API_IMAGE (the API replicas' image); log: $BUILD_DIR/logs/build-api.log"
  local start=$SECONDS
  if ! "${BUILDAH[@]}" bud --isolation chroot --network host --format docker --pull=false \
      --target api --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
      -f "$REPO/Dockerfile" -t "$API_IMAGE" "$REPO" >"$BUILD_DIR/logs/build-api.log" 2>&1; then
    tail -n 30 "$BUILD_DIR/logs/build-api.log" >&2
    die "buildah bud --target api failed, see $BUILD_DIR/logs/build-api.log"
  fi
  info "built $API_IMAGE in $((SECONDS - start)) s: $(human "$(image_size "$API_IMAGE")") (uncompressed)"
}

stop_torch_index() {
  if [ -n "$TORCH_INDEX_PID" ]; then kill "$TORCH_INDEX_PID" 2>/dev/null || true; TORCH_INDEX_PID=""; fi
}

image_size() { "${PODMAN[@]}" image inspect --format '{{.Size}}' "${1:-$IMAGE}"; }

# -------------------------------------------------------------------------------------------- run
REDIS_PID=""
cleanup() {
  "${PODMAN[@]}" rm -f --ignore -t 5 "$RUN_ID-api" "$RUN_ID-worker" "$RUN_ID-api-redis" >/dev/null 2>&1 || true
  if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; fi
  stop_torch_index
}

# The open-file and process limits podman sets by default (1048576 and more) can be above what root
# may set where CAP_SYS_RESOURCE is withheld (as in some VMs): the shell's own hard limits, capped.
limit() { local value; value=$(ulimit -H "$1"); [ "$value" = unlimited ] || [ "$value" -gt "$2" ] && value=$2; echo "$value"; }
NOFILE=$(limit -n 1048576)
NPROC=$(limit -u 32768)

# podman run with the Kubernetes manifests' pod security: user 10001 (the image's), read-only root,
# writable /tmp and /models (emptyDir there), no capabilities, no privilege escalation
run_container() {
  local name=$1; shift
  "${PODMAN[@]}" run -d --name "$name" --network host --read-only \
    --tmpfs /tmp:rw,mode=1777 --tmpfs /models:rw,mode=1777 \
    --cap-drop ALL --security-opt no-new-privileges \
    --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC" "$@" >/dev/null 2>>"$BUILD_DIR/logs/podman.log" \
    || { tail -n 5 "$BUILD_DIR/logs/podman.log" >&2; die "podman run of $name failed"; }
}

show_logs_and_die() {
  local name=$1 message=$2
  echo "--- last log lines of $name:" >&2
  "${PODMAN[@]}" logs --tail 40 "$name" >&2 || true
  die "$message"
}

smoke() { "$HOST_PYTHON" "$SMOKE" "$@"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# check NAME CONTAINER SMOKE-ARGS...: runs one smoke check, prints its answer, or the container's
# log and stops the script
check() {
  local label=$1 name=$2 out; shift 2
  out=$(smoke "$@") || show_logs_and_die "$name" "$label"
  info "$label: $out"
}

healthcheck() {
  "${PODMAN[@]}" healthcheck run "$1" >/dev/null || show_logs_and_die "$1" "the image's HEALTHCHECK failed in $1"
  info "HEALTHCHECK of $1: healthy"
}

run_checks() {
  "${PODMAN[@]}" image exists "$IMAGE" || die "no image $IMAGE: run '$0 build' first"
  local api_port api_url start
  api_port=$(free_port); api_url="http://127.0.0.1:$api_port"

  step "podman run $IMAGE (default command fastcache-serve, in-process queue) on $api_url"
  start=$(date +%s.%N)
  run_container "$RUN_ID-api" -e FASTCACHE_PORT="$api_port" "$IMAGE"
  # podman run returns once the process started; with vfs, creating the container copies the image
  CREATE_SECONDS=$(since "$start")
  start=$(date +%s.%N)
  smoke ready "$api_url" --timeout "$READY_TIMEOUT" >/dev/null \
    || show_logs_and_die "$RUN_ID-api" "/readyz did not answer 200 within $READY_TIMEOUT s"
  READY_SECONDS=$(since "$start")
  info "podman run (create and start): ${CREATE_SECONDS} s; then /readyz 200 after ${READY_SECONDS} s"
  info "runs as $("${PODMAN[@]}" exec "$RUN_ID-api" id -u):$("${PODMAN[@]}" exec "$RUN_ID-api" id -g), FASTCACHE_MODEL=$("${PODMAN[@]}" exec "$RUN_ID-api" printenv FASTCACHE_MODEL), bundled: $("${PODMAN[@]}" exec "$RUN_ID-api" ls /app/models | tr '\n' ' ')"
  check "POST /generate" "$RUN_ID-api" generate "$api_url"
  check "/metrics" "$RUN_ID-api" metrics "$api_url"
  healthcheck "$RUN_ID-api"
  "${PODMAN[@]}" stop -t 60 "$RUN_ID-api" >/dev/null 2>>"$BUILD_DIR/logs/podman.log"
  info "SIGTERM: exit status $("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$RUN_ID-api")"
  "${PODMAN[@]}" rm -f "$RUN_ID-api" >/dev/null 2>>"$BUILD_DIR/logs/podman.log"

  step "redis-server on the host (appendonly yes, as docker-compose.yml and deploy/base/redis.yaml run it)"
  local redis_port redis_url redis_dir="$BUILD_DIR/redis"
  redis_port=$(free_port); redis_url="redis://127.0.0.1:$redis_port/0"
  rm -rf "$redis_dir" && mkdir -p "$redis_dir"
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$redis_dir" --appendonly yes --save "" \
    --maxmemory-policy noeviction --daemonize no >"$BUILD_DIR/logs/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.2; done
  info "$redis_url: appendonly $(redis-cli -p "$redis_port" config get appendonly | tail -n 1)"

  local worker_port worker_url
  worker_port=$(free_port); worker_url="http://127.0.0.1:$worker_port"
  step "podman run $IMAGE fastcache-worker --redis $redis_url (FASTCACHE_METRICS_PORT=$worker_port)"
  # the port through the environment, as the Kubernetes ConfigMap sets it: the HEALTHCHECK reads
  # FASTCACHE_METRICS_PORT and cannot see a --metrics-port flag
  run_container "$RUN_ID-worker" -e FASTCACHE_DEVICE=cpu -e FASTCACHE_METRICS_PORT="$worker_port" "$IMAGE" \
    fastcache-worker --redis "$redis_url"
  start=$(date +%s.%N)
  smoke ready "$worker_url" --timeout "$READY_TIMEOUT" >/dev/null \
    || show_logs_and_die "$RUN_ID-worker" "worker /readyz did not answer 200 within $READY_TIMEOUT s"
  info "worker /readyz 200 after $(since "$start") s (from its start)"
  check "worker /metrics" "$RUN_ID-worker" metrics "$worker_url"
  healthcheck "$RUN_ID-worker"
  info "Redis: $(redis-cli -p "$redis_port" client list | grep -vc 'cmd=client') client connection(s) from the worker"

  "${PODMAN[@]}" image exists "$API_IMAGE" || die "no image $API_IMAGE: run '$0 build' first"
  step "podman run $API_IMAGE with FASTCACHE_QUEUE=$redis_url: one generation through the worker"
  local api2_port api2_url
  api2_port=$(free_port); api2_url="http://127.0.0.1:$api2_port"
  start=$(date +%s.%N)
  run_container "$RUN_ID-api-redis" -e FASTCACHE_PORT="$api2_port" -e FASTCACHE_QUEUE="$redis_url" "$API_IMAGE"
  smoke ready "$api2_url" --timeout "$READY_TIMEOUT" >/dev/null \
    || show_logs_and_die "$RUN_ID-api-redis" "API on the Redis queue: /readyz did not answer 200"
  info "$API_IMAGE: /readyz 200 $(since "$start") s after podman run"
  "${PODMAN[@]}" exec "$RUN_ID-api-redis" python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    || show_logs_and_die "$RUN_ID-api-redis" "$API_IMAGE has torch installed"
  info "$API_IMAGE: no torch installed"
  check "POST /generate via Redis" "$RUN_ID-worker" generate "$api2_url"
  local consumers
  consumers=$(redis-cli -p "$redis_port" xinfo consumers fastcache:jobs fastcache-workers | grep -c '^name$' || true)
  info "consumer group fastcache-workers of fastcache:jobs: $consumers consumer(s); entries left in the stream: $(redis-cli -p "$redis_port" xlen fastcache:jobs)"
  [ "$consumers" -ge 1 ] || show_logs_and_die "$RUN_ID-worker" "the worker never joined the consumer group"

  step "SIGTERM: the containers stop cleanly"
  local name code
  for name in "$RUN_ID-api-redis" "$RUN_ID-worker"; do
    "${PODMAN[@]}" stop -t 60 "$name" >/dev/null 2>>"$BUILD_DIR/logs/podman.log"
    code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$name")
    info "$name: exit status $code"
    [ "$code" = 0 ] || show_logs_and_die "$name" "$name exited with status $code after SIGTERM"
  done
}

summary() {
  step "summary"
  info "image $IMAGE: $(human "$(image_size)") uncompressed ($(image_size) bytes)"
  "${PODMAN[@]}" image exists "$API_IMAGE" \
    && info "image $API_IMAGE: $(human "$(image_size "$API_IMAGE")") uncompressed ($(image_size "$API_IMAGE") bytes)"
  [ -f "$BUILD_DIR/build-seconds" ] && info "build time: $(cat "$BUILD_DIR/build-seconds") s (buildah bud, this machine)"
  [ -n "${READY_SECONDS:-}" ] && info "time to ready: ${READY_SECONDS} s (container start to /readyz 200, API with the bundled model; podman run itself: ${CREATE_SECONDS} s)"
  info "all checks passed"
}

main() {
  local what="${1:-all}"
  case "$what" in
    clean) rm -rf "$BUILD_DIR"; echo "removed $BUILD_DIR"; return ;;
    base|build|api|run|all) ;;
    *) echo "usage: $0 [all|base|build|api|run|clean]" >&2; exit 2 ;;
  esac
  need_tools "$what"
  trap cleanup EXIT
  case "$what" in
    base) base ;;
    build) build; summary ;;
    api) "${PODMAN[@]}" image exists "$BASE_IMAGE" || die "no base image $BASE_IMAGE: run '$0 base' first"
         build_api ;;
    run) run_checks; summary ;;
    all) base; build; run_checks; summary ;;
  esac
}

main "$@"
