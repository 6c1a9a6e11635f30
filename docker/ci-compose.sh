#!/usr/bin/env bash
# CI check of the containers: the seed's scenario with docker/compose.yaml, end to end.
#
#   bash docker/ci-compose.sh       # as root, CI=true, no stdin; .ci/run calls it
#
# Ensures a Docker engine (docker/ensure-docker.sh), builds every image without a
# registry (docker/build-images.sh), starts the compose project, waits for the sample
# row in data/streaming_output.txt, runs the seed's UPDATE and soft delete with psql in
# the Postgres container, and checks the three lines: their order and values. The
# project is always removed again (`down -v`); on failure the services' state and logs
# are printed first. Prints the time of each step.
#
# Environment:
#   TIDEMARK_CI_COMPOSE_PROJECT  compose project name                   [tidemark-ci]
#   TIDEMARK_DATA_DIR            folder mounted at /tmp/data (sink file) [<repo>/data]
#   TIDEMARK_CI_FIRST_WAIT       seconds for the first line, after `up`  [120]
#   TIDEMARK_CI_CHANGE_WAIT      seconds for each change's line          [30]
# and build-images.sh's (TIDEMARK_OFFLINE, TIDEMARK_*_IMAGE, ...).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

PROJECT=${TIDEMARK_CI_COMPOSE_PROJECT:-tidemark-ci}
export TIDEMARK_DATA_DIR="${TIDEMARK_DATA_DIR:-$REPO_DIR/data}"
FIRST_WAIT=${TIDEMARK_CI_FIRST_WAIT:-120}
CHANGE_WAIT=${TIDEMARK_CI_CHANGE_WAIT:-30}
OUT="$TIDEMARK_DATA_DIR/streaming_output.txt"

compose() { docker compose -p "$PROJECT" -f docker/compose.yaml "$@"; }

T0=$SECONDS
step_start=0
step() { step_start=$SECONDS; echo "==> [ci-compose] $1 (t=$((SECONDS - T0))s)"; }
step_end() { echo "<== [ci-compose] $1: $((SECONDS - step_start))s"; }

project_up=
on_exit() {
  local rc=$?
  set +e
  if [[ -n $project_up ]]; then
    if [[ $rc -ne 0 ]]; then
      {
        echo "---- docker compose ps -a ----"
        compose ps -a
        echo "---- docker compose logs (last 80 lines per service) ----"
        compose logs --no-color --timestamps --tail=80
        echo "---- $OUT ----"
        cat "$OUT" 2>/dev/null || echo "(no file)"
      } >&2
    fi
    echo "==> [ci-compose] docker compose down -v" >&2
    compose down -v --remove-orphans --timeout 30 >&2
  fi
  echo "[ci-compose] total: $((SECONDS - T0))s, exit $rc" >&2
  exit $rc
}
trap on_exit EXIT

# check_lines N TIMEOUT: waits up to TIMEOUT s until the sink file holds N complete lines,
# then checks them against the seed scenario's first N row states (and that no more came).
check_lines() {
  python3 - "$OUT" "$1" "$2" <<'PY'
import json, sys, time

path, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# The seed's row states, in order: the sample row, the update, the soft delete.
expected = [
    {"id": 1, "data": "test data", "is_soft_deleted": False},
    {"id": 1, "data": "some new data", "is_soft_deleted": False},
    {"id": 1, "data": "some new data", "is_soft_deleted": True},
    {"id": 1, "data": "after restart", "is_soft_deleted": True},
]

def complete_lines():
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]   # a torn last line is not a line yet

deadline = time.monotonic() + timeout
lines = complete_lines()
while len(lines) < want and time.monotonic() < deadline:
    time.sleep(0.2)
    lines = complete_lines()
if len(lines) < want:
    sys.exit(f"{path}: {len(lines)} line(s) after {timeout:.0f} s, want {want}")
if len(lines) > want:
    sys.exit(f"{path}: {len(lines)} lines, want {want} (a change arrived twice?):\n" + "\n".join(lines))

stamps = []
for n, (line, exp) in enumerate(zip(lines, expected), 1):
    try:
        record = json.loads(line)
        payload, schema = record["payload"], record["schema"]
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f"line {n} is not a {{schema, payload}} JSON record ({e}): {line}")
    if schema.get("name") != "streaming_update_table":
        sys.exit(f"line {n}: schema name {schema.get('name')!r}, want 'streaming_update_table'")
    got = {k: payload.get(k) for k in exp}
    if got != exp:
        sys.exit(f"line {n}: got {got}, want {exp}\n{line}")
    stamps.append(payload.get("last_updated"))
    print(f"  line {n}: id={got['id']} data={got['data']!r} "
          f"is_soft_deleted={str(got['is_soft_deleted']).lower()} last_updated={stamps[-1]}")
if not all(isinstance(s, int) for s in stamps) or any(a >= b for a, b in zip(stamps, stamps[1:])):
    sys.exit(f"last_updated does not increase strictly: {stamps}")
PY
}

psql_in_postgres() {
  compose exec -T postgres psql -v ON_ERROR_STOP=1 -X -U postgres -d streaming_example -c "$1"
}

# wait_healthy SERVICE TIMEOUT: waits until the service's container reports healthy.
wait_healthy() {
  local service=$1 deadline=$((SECONDS + $2)) id status
  id=$(compose ps -q "$service")
  [[ -n $id ]] || { echo "[ci-compose] $service has no container" >&2; return 1; }
  while :; do
    status=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    [[ $status == running/healthy ]] && { echo "  $service: healthy"; return 0; }
    if [[ $status != running/* ]] || (( SECONDS >= deadline )); then
      echo "[ci-compose] $service is $status (want running/healthy)" >&2
      docker inspect -f '{{range .State.Health.Log}}{{.Output}}{{end}}' "$id" >&2 || true
      return 1
    fi
    sleep 1
  done
}

step "ensure docker"
bash docker/ensure-docker.sh </dev/null
command -v python3 >/dev/null || { echo "[ci-compose] python3 not found (it checks the sink file)" >&2; exit 1; }
step_end "ensure docker"

step "build images"
exports="$(bash docker/build-images.sh </dev/null)"   # assignment: a failed build stops here
eval "$exports"
echo "$exports"
step_end "build images"

step "compose up (project $PROJECT)"
mkdir -p "$TIDEMARK_DATA_DIR"
# A file and checkpoint from an earlier run name offsets of a Kafka that no longer exists.
for f in "$OUT" "$OUT.tidemark-checkpoint" "$OUT.dead-letter"; do
  [[ -e $f ]] && { echo "  removing stale $f"; rm -f "$f"; }
done
compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true   # leftovers of a killed run
project_up=1
compose up -d --no-build --pull never </dev/null
step_end "compose up"

step "sample row arrives"
check_lines 1 "$FIRST_WAIT"
step_end "sample row arrives"

step "UPDATE ... SET data = 'some new data'"
psql_in_postgres "UPDATE streaming_update_table SET data = 'some new data' WHERE id = 1"
check_lines 2 "$CHANGE_WAIT"
step_end "update arrives"

step "UPDATE ... SET is_soft_deleted = true"
psql_in_postgres "UPDATE streaming_update_table SET is_soft_deleted = true WHERE id = 1"
check_lines 3 "$CHANGE_WAIT"
step_end "soft delete arrives"

step "healthchecks; nothing more arrives"
wait_healthy pg-source 60
wait_healthy file-sink 60
check_lines 3 0
step_end "healthchecks"

step "docker compose restart pg-source file-sink: nothing lost or repeated"
compose restart --timeout 20 pg-source file-sink
wait_healthy pg-source 60
wait_healthy file-sink 60
for service in pg-source file-sink; do
  # The logs whole first: with pipefail, `compose logs | grep -q` fails when
  # grep stops reading at its match before compose has written everything.
  logs=$(compose logs --no-color "$service")
  grep -q "${service} stopped" <<<"$logs" \
    || { echo "[ci-compose] $service did not stop cleanly on SIGTERM" >&2; exit 1; }
done
check_lines 3 0
psql_in_postgres "UPDATE streaming_update_table SET data = 'after restart' WHERE id = 1"
check_lines 4 "$CHANGE_WAIT"
step_end "restart"

echo "[ci-compose] seed scenario passed: 4 lines in $OUT, across a restart"
