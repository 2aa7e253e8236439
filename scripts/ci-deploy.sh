#!/usr/bin/env bash
# CI: start deploy-release/<environment> on the Prefect server and follow it to its end.
#   scripts/ci-deploy.sh staging -p image_tag=1.4.2 --timeout 900
# Needs PREFECT_API_URL (https://.../api) and PREFECT_API_AUTH_STRING from CI secrets.
# Exit: 0 deployed, 1 failed and rolled back, 2 could not start, 3 timed out (run cancelled),
# 4 failed otherwise (rollback unhealthy or the run crashed: look now). See deployments/ci_deploy.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deployments.ci_deploy "$@"
