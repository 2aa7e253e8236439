#!/usr/bin/env bash
# Idempotent set-up: the Python environment from the lock file and, with --system, the system
# packages the integration tests need (Docker Engine, pebble, nginx, busybox). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

want_system=0
lock=requirements.lock
for arg in "$@"; do
  case "$arg" in
    --system) want_system=1 ;;
    --dev) lock=requirements-dev.lock ;;
    *) echo "setup.sh: unknown argument $arg (use --dev, --system)" >&2; exit 2 ;;
  esac
done

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv"
  python3 -m pip install --quiet uv
fi

if [ ! -x .venv/bin/python ]; then
  uv venv --quiet --python "$(command -v python3)" .venv
fi
# The dev lock is a superset of the runtime lock: syncing it makes the venv exactly the dev set; the
# runtime lock is only installed on top (never removing the test tools of a dev venv).
stamp=.venv/.installed-$(sha256sum "$lock" | cut -c1-16)
dev_stamp=.venv/.installed-$(sha256sum requirements-dev.lock | cut -c1-16)
if [ "$lock" = requirements.lock ] && [ -f "$dev_stamp" ]; then
  : # a venv synced from the dev lock already holds every runtime pin: nothing to install
elif [ ! -f "$stamp" ]; then
  echo "setup: installing $lock into .venv"
  if [ "$lock" = requirements-dev.lock ]; then
    uv pip sync --quiet --python .venv/bin/python "$lock"
    rm -f .venv/.installed-*
  else
    uv pip install --quiet --python .venv/bin/python --require-hashes -r "$lock"
  fi
  touch "$stamp"
fi

if [ "$want_system" = 1 ]; then
  missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  command -v pebble >/dev/null 2>&1 || missing+=(pebble)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  command -v git >/dev/null 2>&1 || missing+=(git)
  command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
  # The tests build the project's image from a base made by mmdebstrap (no registry here).
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "setup: need root to install ${missing[*]} (apt-get); install them and run again" >&2
      exit 1
    fi
    echo "setup: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
