#!/usr/bin/env bash
# Entrypoint of the local PostgreSQL image: the subset of the official image's
# docker-entrypoint.sh that Tidemark relies on.
#
# First start (no PG_VERSION in $PGDATA): initdb with POSTGRES_USER (postgres) and
# POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD=trust) plus
# POSTGRES_INITDB_ARGS; network clients authenticate with POSTGRES_HOST_AUTH_METHOD
# (scram-sha-256); POSTGRES_DB (default: the user's name) is created; files in
# /docker-entrypoint-initdb.d (*.sh, *.sql, *.sql.gz) run against a server that
# listens only on its unix socket, so healthchecks over TCP fail until the real start.
set -Eeuo pipefail

# `docker run IMAGE -c fsync=off` means `postgres -c fsync=off`.
if [[ ${1:-} == -* ]]; then
  set -- postgres "$@"
fi

if [[ ${1:-} != postgres ]]; then
  exec "$@"
fi

if [[ $(id -u) == 0 ]]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  chmod 3777 /var/run/postgresql
  # Start again as the postgres user (setpriv is in util-linux, like runuser).
  exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

log() { echo "docker-entrypoint: $*" >&2; }

POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
POSTGRES_HOST_AUTH_METHOD=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}

init_cluster() {
  if [[ -z ${POSTGRES_PASSWORD:-} && $POSTGRES_HOST_AUTH_METHOD != trust ]]; then
    cat >&2 <<MSG
docker-entrypoint: error: the database is uninitialized and no superuser password is set.
  Set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust to allow every connection
  without a password, which is unsafe).
MSG
    exit 1
  fi
  log "initdb $PGDATA (superuser $POSTGRES_USER)"
  local pwfile
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
  # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words, as upstream
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=trust \
    --encoding=UTF8 --locale=C.UTF-8 ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA" >&2
  rm -f "$pwfile"
  printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >> "$PGDATA/pg_hba.conf"

  # A private server for the setup: unix socket only, so nothing outside sees it as ready.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w -t 60 start >&2
  local psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc -X -U "$POSTGRES_USER" -h /var/run/postgresql)
  if [[ $POSTGRES_DB != postgres ]]; then
    log "create database $POSTGRES_DB"
    "${psql[@]}" -d postgres --set db="$POSTGRES_DB" <<<'create database :"db";' >&2
  fi
  local f
  for f in /docker-entrypoint-initdb.d/*; do
    [[ -e $f ]] || continue
    case $f in
      *.sh)     log "running $f"; if [[ -x $f ]]; then "$f"; else . "$f"; fi ;;
      *.sql)    log "running $f"; "${psql[@]}" -d "$POSTGRES_DB" -f "$f" >&2 ;;
      *.sql.gz) log "running $f"; gunzip -c "$f" | "${psql[@]}" -d "$POSTGRES_DB" >&2 ;;
      *)        log "ignoring $f" ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w -t 60 stop >&2
  log "initialized; starting"
}

if [[ ! -s $PGDATA/PG_VERSION ]]; then
  init_cluster
fi

exec "$@"
