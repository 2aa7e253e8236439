#!/usr/bin/env bash
# The main job on one machine: a local Prefect server with its UI on 127.0.0.1:4200, and every
# deployment served with its schedules against the embedded default stack (or ops.toml / OPS_*).
# Ctrl-C (or SIGTERM to this script) stops the deployments, then the server this script started,
# within 10 s: serve bounds its own stop (deployments/serve.py), the server gets 3 s after it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
state=$(mktemp)
mkdir -p var/prefect var/backups var/uploads
server_pid=""
serve_pid=""
stop_pid() {  # stop_pid PID SECONDS: SIGTERM, then SIGKILL when still there after SECONDS
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 1 $(($2 * 10))); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  trap '' INT TERM
  # serve first, while the server still answers: its graceful stop pauses the schedules.
  if [ -n "$serve_pid" ]; then stop_pid "$serve_pid" 8; fi
  if [ -n "$server_pid" ]; then stop_pid "$server_pid" 3; fi
  scripts/services.sh down "$state"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
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

# Its own session: Ctrl-C reaches serve, and the server is stopped after serve is gone.
setsid .venv/bin/prefect server start --host 127.0.0.1 --port "$port" >var/prefect/server.log 2>&1 &
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
# In the background and waited for: bash runs a trap only between commands, and `wait` is one.
.venv/bin/python -m deployments.serve &
serve_pid=$!
wait "$serve_pid"
