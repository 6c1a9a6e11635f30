#!/usr/bin/env bash
# Makes sure a Docker engine answers, with the `docker compose` v2 and `docker buildx`
# plugins, on a Debian bookworm machine without systemd and without an image registry.
# Idempotent: what is already there is left alone. Runs as root, non-interactively
# (CI=true, no stdin). Logs go to stderr; stdout stays empty.
#
#   docker/ensure-docker.sh
#
# Environment:
#   TIDEMARK_DOCKERD_LOG   dockerd's log when this script starts it   [/var/log/tidemark-dockerd.log]
#   TIDEMARK_DOCKER_WAIT   seconds to wait for the engine to answer    [60]
set -euo pipefail

DOCKERD_LOG="${TIDEMARK_DOCKERD_LOG:-/var/log/tidemark-dockerd.log}"
DOCKER_WAIT="${TIDEMARK_DOCKER_WAIT:-60}"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
export DEBIAN_FRONTEND=noninteractive

log() { echo "ensure-docker: $*" >&2; }
die() { echo "ensure-docker: error: $*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "need root to $* (or do it yourself)"; }

deb_installed() {
  [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

APT_UPDATED=
apt_install() {
  need_root "apt-get install $*"
  # Wait for another apt (e.g. dev/services install-deps) instead of failing on its lock.
  local apt=(apt-get -q -y -o DPkg::Lock::Timeout=600) out
  out=$(mktemp)
  if [[ -z $APT_UPDATED ]]; then
    log "apt-get update"
    "${apt[@]}" update </dev/null >"$out" 2>&1 || { cat "$out" >&2; die "apt-get update failed"; }
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  "${apt[@]}" install --no-install-recommends "$@" </dev/null >"$out" 2>&1 \
    || { cat "$out" >&2; rm -f "$out"; die "apt-get install $* failed"; }
  rm -f "$out"
}

# Installs CLI plugins (PKG:PLUGIN ...) from Debian trixie's packages into $PLUGIN_DIR.
# Bookworm has no compose v2 or buildx; trixie's are static Go binaries that work here
# with the 20.10 engine. The trixie source lives only in a private apt state under a
# temp dir, so the machine's apt sources never see it: nothing to remove afterwards,
# even if this script dies half-way.
install_trixie_plugins() {
  need_root "install plugins into $PLUGIN_DIR"
  local tmp spec pkg plugin deb bin
  tmp=$(mktemp -d /tmp/tidemark-trixie.XXXXXX)
  chmod 755 "$tmp"                     # apt downloads as the _apt user
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  mkdir -p "$tmp/sources" "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
  chown _apt "$tmp/lists/partial" "$tmp/deb" 2>/dev/null || true
  cat > "$tmp/sources/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  local apt=(apt-get -q
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$tmp/sources"
    -o "Dir::State::Lists=$tmp/lists"
    -o "Dir::Cache=$tmp/cache"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false")
  log "apt-get update (Debian trixie, private state in $tmp)"
  "${apt[@]}" update </dev/null >"$tmp/apt.log" 2>&1 \
    || { cat "$tmp/apt.log" >&2; die "apt-get update (trixie) failed"; }
  for spec in "$@"; do
    pkg=${spec%%:*} plugin=${spec#*:}
    rm -rf "$tmp/root" "$tmp/deb"/*.deb
    (cd "$tmp/deb" && "${apt[@]}" download "$pkg/trixie" </dev/null >"$tmp/apt.log" 2>&1) \
      || { cat "$tmp/apt.log" >&2; die "apt-get download $pkg/trixie failed"; }
    deb=$(echo "$tmp"/deb/*.deb)
    dpkg-deb -x "$deb" "$tmp/root"
    bin="$tmp/root/usr/libexec/docker/cli-plugins/$plugin"
    [[ -x $bin ]] || die "$pkg's package has no usr/libexec/docker/cli-plugins/$plugin"
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$bin" "$PLUGIN_DIR/$plugin"
    log "installed $PLUGIN_DIR/$plugin ($pkg $(dpkg-deb -f "$deb" Version))"
  done
}

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

# --- engine and client ---------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker >/dev/null || missing+=(docker.io)
deb_installed iptables || missing+=(iptables)
if [[ ${#missing[@]} -gt 0 ]]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  apt_install "${missing[@]}"
fi

# --- plugins -------------------------------------------------------------------
plugins=()
docker compose version >/dev/null 2>&1 || plugins+=(docker-compose:docker-compose)
docker buildx version >/dev/null 2>&1 || plugins+=(docker-buildx:docker-buildx)
[[ ${#plugins[@]} -eq 0 ]] || install_trixie_plugins "${plugins[@]}"

# --- daemon --------------------------------------------------------------------
if engine_answers; then
  log "docker engine answers ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
  exit 0
fi

if pgrep -x dockerd >/dev/null; then
  log "dockerd runs but does not answer yet; waiting"
else
  need_root "start dockerd"
  log "starting dockerd (log $DOCKERD_LOG)"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  # setsid + nohup: its own session, so it outlives this script and a Ctrl-C in the
  # caller's terminal; no fds of ours (a `$(...)` caller must not wait for it).
  setsid nohup dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 &
fi

deadline=$((SECONDS + DOCKER_WAIT))
until engine_answers; do
  if (( SECONDS >= deadline )); then
    { echo "---- last lines of $DOCKERD_LOG ----"; tail -n 30 "$DOCKERD_LOG" 2>/dev/null; } >&2
    die "docker engine did not answer within $DOCKER_WAIT s"
  fi
  if ! pgrep -x dockerd >/dev/null; then
    { echo "---- last lines of $DOCKERD_LOG ----"; tail -n 30 "$DOCKERD_LOG" 2>/dev/null; } >&2
    die "dockerd exited during startup"
  fi
  sleep 0.5
done
log "docker engine answers ($(docker version -f '{{.Server.Version}}' 2>/dev/null), storage $(docker info -f '{{.Driver}}' 2>/dev/null))"
