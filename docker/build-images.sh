#!/usr/bin/env bash
# Builds every image docker/compose.yaml and the tests need, on a machine without an
# image registry (only Debian's archive, Maven Central and crates.io reachable):
#
#   base      Debian bookworm, debootstrap --variant=minbase + docker import
#   postgres  PostgreSQL 15 from Debian's packages, run like the official image
#   kafka     Kafka from the jars dev/services caches (Maven Central), run like apache/kafka
#   rust      builder: the base + build packages + the host's rustup toolchain
#   tidemark  schema-init, pg-source, file-sink, pg-replay (docker/Dockerfile) from this workspace
#
# Stdout is only export lines naming the images, for compose and tests:
#
#   eval "$(docker/build-images.sh)"
#   docker compose -f docker/compose.yaml up
#
# A second run reuses what is built: the local base images carry a label with the hash
# of their inputs and are rebuilt only when it changes (to pick up Debian's security
# updates, `docker rmi tidemark-local/debian:bookworm`: everything on it follows).
# Tidemark's images always go through the build, whose layer and cargo caches make an
# unchanged tree a no-op.
#
# Environment (defaults in brackets):
#   TIDEMARK_OFFLINE=1|0          1: build the local base images [1]; 0: use the public
#                                 ones (rust:1-bookworm, debian:bookworm-slim, postgres:15,
#                                 apache/kafka:4.3.1), pulled by docker
#   TIDEMARK_LOCAL_PREFIX         name prefix of the locally made images [tidemark-local/]
#   TIDEMARK_BASE_IMAGE           Debian base                 [<local>debian:bookworm]
#   TIDEMARK_RUST_IMAGE           Rust builder                [<local>rust:<host rustc>-bookworm]
#   TIDEMARK_RUNTIME_IMAGE        base of Tidemark's images   [the Debian base]
#   TIDEMARK_POSTGRES_IMAGE       PostgreSQL                  [<local>postgres:15]
#   TIDEMARK_KAFKA_IMAGE          Kafka                       [<local>kafka:<dev/services' version>]
#   TIDEMARK_IMAGE_PREFIX         prefix of Tidemark's images [tidemark/] (<prefix>pg-source:latest)
#   TIDEMARK_BUILD_CONTEXT        Tidemark's build context    [the repository root]
#                                 (e.g. a `git archive` snapshot; it needs /.dockerignore and
#                                 docker/tidemark/ too)
#   TIDEMARK_CACHE_DIR            dev/services' download cache (Kafka jars) [$HOME/.cache/tidemark]
# An image name given that is not a local default is used as is (pulled if missing).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
export DEBIAN_FRONTEND=noninteractive DOCKER_BUILDKIT=1

log() { echo "build-images: $*" >&2; }
die() { echo "build-images: error: $*" >&2; exit 1; }

if ! command -v rustc >/dev/null && [[ -x $HOME/.cargo/bin/rustc ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

OFFLINE=${TIDEMARK_OFFLINE:-1}
LOCAL=${TIDEMARK_LOCAL_PREFIX:-tidemark-local/}
KAFKA_VERSION=$(sed -n 's/^KAFKA_VERSION=//p' dev/services)
[[ -n $KAFKA_VERSION ]] || die "no KAFKA_VERSION= line in dev/services"
CACHE_DIR="$(realpath -m "${TIDEMARK_CACHE_DIR:-$HOME/.cache/tidemark}")"
KAFKA_LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
IMAGE_PREFIX=${TIDEMARK_IMAGE_PREFIX:-tidemark/}
BUILD_CONTEXT=${TIDEMARK_BUILD_CONTEXT:-$REPO_DIR}
RECIPE_LABEL=org.tidemark.recipe
PROGRESS=plain
[[ -t 2 && -z ${CI:-} ]] && PROGRESS=auto

if [[ $OFFLINE == 1 ]]; then
  command -v rustc >/dev/null || die "rustc not found: the offline Rust builder copies the host's toolchain"
  RUST_VERSION=$(rustc --version | awk '{print $2}')
  LOCAL_BASE="${LOCAL}debian:bookworm"
  LOCAL_RUST="${LOCAL}rust:${RUST_VERSION}-bookworm"
  LOCAL_POSTGRES="${LOCAL}postgres:15"
  LOCAL_KAFKA="${LOCAL}kafka:$KAFKA_VERSION"
  BASE_IMAGE=${TIDEMARK_BASE_IMAGE:-$LOCAL_BASE}
  RUST_IMAGE=${TIDEMARK_RUST_IMAGE:-$LOCAL_RUST}
  RUNTIME_IMAGE=${TIDEMARK_RUNTIME_IMAGE:-$BASE_IMAGE}
  POSTGRES_IMAGE=${TIDEMARK_POSTGRES_IMAGE:-$LOCAL_POSTGRES}
  KAFKA_IMAGE=${TIDEMARK_KAFKA_IMAGE:-$LOCAL_KAFKA}
else
  LOCAL_BASE='' LOCAL_RUST='' LOCAL_POSTGRES='' LOCAL_KAFKA=''
  BASE_IMAGE=
  RUST_IMAGE=${TIDEMARK_RUST_IMAGE:-rust:1-bookworm}
  RUNTIME_IMAGE=${TIDEMARK_RUNTIME_IMAGE:-debian:bookworm-slim}
  POSTGRES_IMAGE=${TIDEMARK_POSTGRES_IMAGE:-postgres:15}
  KAFKA_IMAGE=${TIDEMARK_KAFKA_IMAGE:-apache/kafka:$KAFKA_VERSION}
fi

T0=$SECONDS
TIMINGS=()
step_start=0
step() { step_start=$SECONDS; log "==> $*"; }
step_end() { TIMINGS+=("$(printf '%-28s %4ss' "$1" $((SECONDS - step_start)))"); }

TMP_DIRS=()
cleanup() {
  local d
  for d in "${TMP_DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
make_tmp() {   # make_tmp VAR: a temp dir on the same filesystem as the caches (hard links)
  local d
  d=$(mktemp -d /var/tmp/tidemark-build.XXXXXX)
  TMP_DIRS+=("$d")
  printf -v "$1" '%s' "$d"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_recipe() { docker image inspect -f "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "$1" 2>/dev/null || true; }
image_id() { docker image inspect -f '{{.Id}}' "$1"; }

# hash_inputs PATH...: one short hash over the files' names and contents, plus stdin.
hash_inputs() {
  {
    cat
    local p
    for p in "$@"; do
      (cd "$p" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    done
  } | sha256sum | cut -c1-16
}

# need_image NAME: for an image that is not ours to build; pulled if missing.
need_image() {
  if ! image_exists "$1"; then
    log "pulling $1"
    docker pull "$1" >&2 || die "image $1 is missing and cannot be pulled (no registry? build it locally: TIDEMARK_OFFLINE=1)"
  fi
}

# build_local NAME RECIPE CONTEXT [docker build args...]: builds unless NAME carries RECIPE.
build_local() {
  local name=$1 recipe=$2 context=$3; shift 3
  if [[ $(image_recipe "$name") == "$recipe" ]]; then
    log "$name is up to date (recipe $recipe)"
    return 0
  fi
  log "building $name (recipe $recipe)"
  local old_id
  old_id=$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true)
  docker build --progress="$PROGRESS" --label "$RECIPE_LABEL=$recipe" -t "$name" "$@" "$context" >&2 \
    || die "docker build of $name failed"
  remove_if_dangling "$old_id"
}

# remove_if_dangling ID: drops the image a rebuild replaced, unless something still uses it.
remove_if_dangling() {
  [[ -n $1 ]] || return 0
  if [[ $(docker image inspect -f '{{len .RepoTags}}' "$1" 2>/dev/null) == 0 ]]; then
    docker rmi "$1" >/dev/null 2>&1 && log "removed the replaced image ${1:7:12}" || true
  fi
}

# ---------------------------------------------------------------------------------------
# Debian base: debootstrap minbase, made as small as debian:bookworm-slim (no docs, man
# pages or locales), security updates applied, apt sources like the official image.
make_base_image() {
  local name=$1 recipe=$2 root
  command -v debootstrap >/dev/null || {
    log "apt-get install debootstrap"
    apt-get -q -y -o DPkg::Lock::Timeout=600 update -qq </dev/null >&2
    apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends debootstrap </dev/null >&2 \
      || die "apt-get install debootstrap failed"
  }
  make_tmp root
  root="$root/rootfs"
  log "debootstrap --variant=minbase bookworm $root"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; die "debootstrap failed (log above)"; }

  rm -f "$root/etc/apt/sources.list"
  cat > "$root/etc/apt/sources.list.d/debian.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  # What debian:bookworm-slim leaves out, for this image and every package installed on it.
  cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CFG
  cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
CFG
  # Nothing starts services inside a build.
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"

  log "applying bookworm-updates and bookworm-security"
  chroot "$root" apt-get -q -y update >>"$root.log" 2>&1 \
    && chroot "$root" apt-get -q -y -o Dpkg::Options::=--force-confold upgrade >>"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; die "apt-get upgrade in the base image failed"; }

  (
    cd "$root"
    find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf usr/share/man/* usr/share/groff/* usr/share/info/* usr/share/lintian/* \
      usr/share/linda/* usr/share/locale/* \
      var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/lib/dpkg/*-old \
      var/log/* tmp/* var/tmp/* root/.bash_history
    : > etc/resolv.conf
    : > etc/machine-id
    rm -f etc/hostname
  )
  log "docker import $name ($(du -sh "$root" | cut -f1))"
  local old_id
  old_id=$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true)
  tar -C "$root" --numeric-owner -c . | docker import \
      --change "LABEL $RECIPE_LABEL=$recipe" \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' \
      - "$name" >&2 \
    || die "docker import failed"
  remove_if_dangling "$old_id"
}

if [[ $OFFLINE == 1 ]]; then
  step "base image $BASE_IMAGE"
  if [[ $BASE_IMAGE == "$LOCAL_BASE" ]]; then
    recipe=$(declare -f make_base_image | hash_inputs)
    if [[ $(image_recipe "$BASE_IMAGE") == "$recipe" ]]; then
      log "$BASE_IMAGE is up to date (recipe $recipe)"
    else
      make_base_image "$BASE_IMAGE" "$recipe"
    fi
  else
    need_image "$BASE_IMAGE"
  fi
  step_end "base"
fi

# ---------------------------------------------------------------------------------------
step "postgres image $POSTGRES_IMAGE"
if [[ -n $LOCAL_POSTGRES && $POSTGRES_IMAGE == "$LOCAL_POSTGRES" ]]; then
  recipe=$(image_id "$BASE_IMAGE" | hash_inputs docker/postgres)
  build_local "$POSTGRES_IMAGE" "$recipe" docker/postgres --build-arg "BASE_IMAGE=$BASE_IMAGE"
else
  need_image "$POSTGRES_IMAGE"
fi
step_end "postgres"

# ---------------------------------------------------------------------------------------
step "kafka image $KAFKA_IMAGE"
if [[ -n $LOCAL_KAFKA && $KAFKA_IMAGE == "$LOCAL_KAFKA" ]]; then
  if [[ ! -f $CACHE_DIR/kafka-$KAFKA_VERSION/.complete ]]; then
    log "fetching Kafka $KAFKA_VERSION jars with dev/services into $KAFKA_LIBS"
    TIDEMARK_CACHE_DIR="$CACHE_DIR" bash dev/services kafka-tool \
        org.apache.kafka.tools.TopicCommand --version </dev/null >/dev/null \
      || die "dev/services could not fetch the Kafka jars"
  fi
  ls "$KAFKA_LIBS"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null || die "no Kafka $KAFKA_VERSION jars in $KAFKA_LIBS"
  recipe=$( { image_id "$BASE_IMAGE"; ls -l "$KAFKA_LIBS"; } | hash_inputs docker/kafka)
  if [[ $(image_recipe "$KAFKA_IMAGE") == "$recipe" ]]; then
    log "$KAFKA_IMAGE is up to date (recipe $recipe)"
  else
    make_tmp ctx
    cp -a docker/kafka/. "$ctx/"
    mkdir -p "$ctx/libs"
    cp -al "$KAFKA_LIBS"/*.jar "$ctx/libs/" 2>/dev/null || cp -a "$KAFKA_LIBS"/*.jar "$ctx/libs/"
    build_local "$KAFKA_IMAGE" "$recipe" "$ctx" --build-arg "BASE_IMAGE=$BASE_IMAGE"
  fi
else
  need_image "$KAFKA_IMAGE"
fi
step_end "kafka"

# ---------------------------------------------------------------------------------------
step "rust builder $RUST_IMAGE"
if [[ -n $LOCAL_RUST && $RUST_IMAGE == "$LOCAL_RUST" ]]; then
  sysroot=$(rustc --print sysroot)
  extra_ca=(/usr/local/share/ca-certificates/*.crt)
  [[ -e ${extra_ca[0]} ]] || extra_ca=()
  recipe=$( { image_id "$BASE_IMAGE"; rustc -vV; cargo -V; cat "${extra_ca[@]}" </dev/null; } | hash_inputs docker/rust)
  if [[ $(image_recipe "$RUST_IMAGE") == "$recipe" ]]; then
    log "$RUST_IMAGE is up to date (recipe $recipe)"
  else
    make_tmp ctx
    cp -a docker/rust/. "$ctx/"
    mkdir -p "$ctx/toolchain" "$ctx/extra-ca"
    # The host's own trust anchors (e.g. of a TLS-inspecting proxy in front of crates.io).
    [[ ${#extra_ca[@]} -eq 0 ]] || cp "${extra_ca[@]}" "$ctx/extra-ca/"
    # The toolchain without share/ (docs, man pages: most of its size).
    for d in bin lib libexec etc; do
      [[ -e $sysroot/$d ]] || continue
      cp -al "$sysroot/$d" "$ctx/toolchain/" 2>/dev/null || cp -a "$sysroot/$d" "$ctx/toolchain/"
    done
    log "toolchain $sysroot: $(du -sh "$ctx/toolchain" | cut -f1)"
    build_local "$RUST_IMAGE" "$recipe" "$ctx" --build-arg "BASE_IMAGE=$BASE_IMAGE"
  fi
else
  need_image "$RUST_IMAGE"
fi
step_end "rust builder"

# ---------------------------------------------------------------------------------------
# Through compose, so that `docker compose build` and this script make the same images
# (same build args, same labels). One shared build stage, built once for all of them.
step "tidemark images ${IMAGE_PREFIX}{schema-init,pg-source,file-sink,pg-replay}:latest"
old_ids=()
for target in schema-init pg-source file-sink pg-replay; do
  old_ids+=("$(docker image inspect -f '{{.Id}}' "${IMAGE_PREFIX}${target}:latest" 2>/dev/null || true)")
done
TIDEMARK_RUST_IMAGE="$RUST_IMAGE" TIDEMARK_RUNTIME_IMAGE="$RUNTIME_IMAGE" \
TIDEMARK_IMAGE_PREFIX="$IMAGE_PREFIX" TIDEMARK_BUILD_CONTEXT="$BUILD_CONTEXT" \
  docker compose -f docker/compose.yaml --progress="$PROGRESS" build schema-init pg-source file-sink pg-replay </dev/null >&2 \
  || die "docker compose build failed"
for id in "${old_ids[@]}"; do remove_if_dangling "$id"; done
step_end "tidemark (4 images)"

log "timings:"
for t in "${TIMINGS[@]}"; do log "  $t"; done
log "  total                        $((SECONDS - T0))s"
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' \
  | grep -E "^(${LOCAL}|${IMAGE_PREFIX})" | sed 's/^/build-images:   /' >&2 || true

cat <<OUT
export TIDEMARK_POSTGRES_IMAGE=$POSTGRES_IMAGE
export TIDEMARK_KAFKA_IMAGE=$KAFKA_IMAGE
export TIDEMARK_RUST_IMAGE=$RUST_IMAGE
export TIDEMARK_RUNTIME_IMAGE=$RUNTIME_IMAGE
export TIDEMARK_IMAGE_PREFIX=$IMAGE_PREFIX
OUT
