# Castellan gateway: slim, non-root, production mode by default, with a health check on the configured port.
# Every backend's extra is installed (Databricks grants and functions, Redis meters); the reference agent
# ships too (`castellan-agent`). Start it with real settings (see compose.yaml): production mode refuses
# the dev defaults (dev auth, demo tools, open /metrics, unbounded token lifetimes), each by name.
# OPA's own evaluator as a C shared library (server/policy/golib): the embedded engine decides exactly as
# OPA with it; without it the engine falls back to regorus restricted to its verified subset.
FROM golang:1.26-bookworm AS opa-library
WORKDIR /src
COPY server/policy/golib ./
RUN CGO_ENABLED=1 go build -trimpath -buildmode=c-shared -ldflags="-s -w" -o /out/libcastellan_opa.so .

FROM python:3.11-slim AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir "uv>=0.13"
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --extra databricks --extra redis --no-install-project
COPY server ./server
COPY tools ./tools
COPY agent_client ./agent_client
COPY policies ./policies
RUN uv sync --locked --no-dev --extra databricks --extra redis

FROM python:3.11-slim
# bubblewrap: catalog functions and stdio upstreams run in its namespaces (see docs/tools.md); the
# container needs unprivileged user namespaces (or --cap-add SYS_ADMIN) for them, else the gateway
# logs the weaker mode it falls back to.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 castellan && mkdir /data && chown castellan:castellan /data
WORKDIR /app
COPY --from=build --chown=castellan:castellan /app /app
COPY --from=opa-library /out/libcastellan_opa.so /app/.cache/opa-library/libcastellan_opa.so
USER castellan
ENV PATH=/app/.venv/bin:$PATH \
    CASTELLAN_ENVIRONMENT=production \
    CASTELLAN_DATA_DIR=/data \
    CASTELLAN_LOG_FORMAT=json \
    CASTELLAN_SERVER__HOST=0.0.0.0 \
    CASTELLAN_SERVER__PORT=8750
# The outbox, meters, catalog and keys live here: mount a volume, or every restart loses the audit trail.
VOLUME ["/data"]
EXPOSE 8750
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('CASTELLAN_SERVER__PORT', '8750'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status != 200)"]
CMD ["castellan", "serve"]
