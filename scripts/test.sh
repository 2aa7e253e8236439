#!/usr/bin/env bash
# The test command: set everything up (idempotently), make sure PostgreSQL and Redis are up, run
# the whole suite against the real services, and stop whatever this script started.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --dev --system

state=$(mktemp)
trap 'scripts/services.sh down "$state"' EXIT
scripts/services.sh up "$state"

export PREFECT_SERVER_ANALYTICS_ENABLED=false
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
  echo "test: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$code"
