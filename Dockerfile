# swagger2mcp-ops: the flows, their locked dependencies and the tools they call, for a Prefect worker's
# jobs (docker and kubernetes work pools) and for the worker itself. `make image` builds it.
#
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t swagger2mcp-ops:0.1.0 .
#
# BASE_IMAGE must be Debian bookworm with python3 (3.11) and its venv module. No HEALTHCHECK: a flow
# run's container ends with the run; the worker is watched by its pool's heartbeat in Prefect.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Extra CAs (a proxy's root) before anything goes out; empty in the repository.
COPY deploy/image/extra-ca/ /usr/local/share/ca-certificates/extra/
# Extra apt sources (deb822 .sources files with their key inline), e.g. PostgreSQL's own repository for
# client majors Debian bookworm does not ship; empty in the repository.
COPY deploy/image/apt/ /tmp/apt-extra/
# PostgreSQL client tools of every server major the flows serve, side by side in
# /usr/lib/postgresql/<major>/bin: a backup runs the pg_dump of its server's major (tasks/pgtools.py),
# so the archive reads with that major's pg_restore anywhere; a server newer than all is refused.
# Bookworm ships 15; more, e.g. "13 14 15 16 17", need the extra source above.
ARG POSTGRES_MAJORS=15
# Also git and node/npm for dependency updates, and tini as PID 1 so SIGTERM reaches the process and
# children are reaped.
RUN find /tmp/apt-extra -name '*.sources' -exec cp {} /etc/apt/sources.list.d/ \; \
 && rm -rf /tmp/apt-extra \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git nodejs npm tini zstd \
      $(for major in $POSTGRES_MAJORS; do echo "postgresql-client-$major"; done) \
 && update-ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Locked dependencies, every file hash-checked; certbot comes from the lock too.
COPY requirements.lock /tmp/requirements.lock
RUN python3 -m venv /opt/venv \
 && PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/venv/bin/pip install --no-deps --require-hashes \
      -r /tmp/requirements.lock \
 && rm /tmp/requirements.lock

RUN useradd --system --create-home --home-dir /home/ops --uid 10001 --user-group ops \
 && mkdir -p /var/lib/swagger2mcp-ops /app \
 && chown ops:ops /var/lib/swagger2mcp-ops

# The flow code, baked in (the deployments' pull step sets this working directory).
WORKDIR /app
COPY prefect.yaml pyproject.toml /app/
COPY deployments /app/deployments
COPY flows /app/flows
COPY tasks /app/tasks

ENV PATH=/opt/venv/bin:$PATH \
    SWAGGER2MCP_OPS_HOME=/app \
    PREFECT_HOME=/home/ops/.prefect \
    PREFECT_TASKS_DEFAULT_NO_CACHE=true \
    NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "swagger2mcp-ops-docker"]
