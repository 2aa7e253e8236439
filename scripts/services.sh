#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis this project's tests and local runs use are up.
#   services.sh up STATE_FILE    start what is down; record what this call started in STATE_FILE
#   services.sh down STATE_FILE  stop only what STATE_FILE says was started here
set -euo pipefail
action=${1:?usage: services.sh up|down STATE_FILE}
state=${2:?usage: services.sh up|down STATE_FILE}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; }

case "$action" in
  up)
    : >"$state"
    if ! pg_up; then
      echo "services: starting PostgreSQL"
      cluster=$(ls /etc/postgresql)
      pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
      echo "postgres $cluster" >>"$state"
      for _ in $(seq 1 30); do pg_up && break; sleep 1; done
      pg_up || { echo "services: PostgreSQL did not come up" >&2; exit 1; }
    fi
    if ! redis_up; then
      echo "services: starting Redis"
      redis_dir=$(mktemp -d)
      redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir "$redis_dir" --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log"
      for _ in $(seq 1 30); do redis_up && break; sleep 0.5; done
      redis_up || { echo "services: Redis did not come up" >&2; exit 1; }
      echo "redis $redis_dir/redis.pid" >>"$state"
    fi
    ;;
  down)
    [ -f "$state" ] || exit 0
    while read -r what arg; do
      case "$what" in
        postgres) pg_ctlcluster --skip-systemctl-redirect "$arg" main stop || true ;;
        redis) [ -f "$arg" ] && kill "$(cat "$arg")" 2>/dev/null || true ;;
      esac
    done <"$state"
    rm -f "$state"
    ;;
  *) echo "usage: services.sh up|down STATE_FILE" >&2; exit 2 ;;
esac
