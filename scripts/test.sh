#!/usr/bin/env bash
# The test command: set everything up (idempotently), make sure PostgreSQL and Redis are up, run
# the whole suite against the real services, and stop whatever this script started.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x). The tests run in
# OPS_TEST_WORKERS processes (default 2, one per core; 0 for one process): most of their time is
# spent waiting for real servers, and every fixture claims its own ports, databases, Redis dbs and
# Docker daemon, so two runs never meet. A test file stays in one process (its module fixtures are
# made once).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --dev --system

state=$(mktemp)
trap 'scripts/services.sh down "$state"' EXIT
scripts/services.sh up "$state"

export PREFECT_SERVER_ANALYTICS_ENABLED=false
workers=${OPS_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
set +e
.venv/bin/python -m pytest "${parallel[@]}" --durations=15 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
  echo "test: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$code"
