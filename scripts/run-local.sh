#!/usr/bin/env bash
# The main job on one machine: a local Prefect server with its UI on 127.0.0.1:4200, and every
# deployment served with its schedules against the embedded default stack (or ops.toml / OPS_*).
# Ctrl-C stops the deployments and the server this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
state=$(mktemp)
mkdir -p var/prefect var/backups var/uploads
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  scripts/services.sh down "$state"
}
trap cleanup EXIT
scripts/services.sh up "$state"

# The embedded default stack's database.
if ! psql -h 127.0.0.1 -U postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'swagger2mcp'" | grep -q 1; then
  createdb -h 127.0.0.1 -U postgres swagger2mcp
fi

export PREFECT_HOME="$PWD/var/prefect"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_TASKS_DEFAULT_NO_CACHE=true
port=${PREFECT_PORT:-4200}
export PREFECT_API_URL="http://127.0.0.1:$port/api"

.venv/bin/prefect server start --host 127.0.0.1 --port "$port" >var/prefect/server.log 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
  if .venv/bin/python -c "import httpx,sys; sys.exit(httpx.get('$PREFECT_API_URL/health', timeout=2).status_code != 200)" 2>/dev/null; then
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || { echo "Prefect server failed; see var/prefect/server.log" >&2; exit 1; }
  sleep 1
done
echo "Prefect UI: http://127.0.0.1:$port"
# Escalation routes (automations.yaml) as automations; idempotent, so every start re-applies them.
.venv/bin/python -m deployments.automations apply
.venv/bin/python -m deployments.serve
