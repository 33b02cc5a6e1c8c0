# Castellan gateway: slim, non-root, with a health check.
FROM python:3.11-slim AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir "uv>=0.13"
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY server ./server
COPY tools ./tools
COPY policies ./policies
RUN uv sync --locked --no-dev

FROM python:3.11-slim
# bubblewrap: catalog functions and stdio upstreams run in its namespaces (see docs/tools.md); the
# container needs unprivileged user namespaces (or --cap-add SYS_ADMIN) for them, else the gateway
# logs the weaker mode it falls back to.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 castellan
WORKDIR /app
COPY --from=build --chown=castellan:castellan /app /app
USER castellan
ENV PATH=/app/.venv/bin:$PATH \
    CASTELLAN_DATA_DIR=/home/castellan/data \
    CASTELLAN_LOG_FORMAT=json \
    CASTELLAN_SERVER__HOST=0.0.0.0 \
    CASTELLAN_SERVER__PUBLIC_URL=http://localhost:8750
EXPOSE 8750
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8750/healthz', timeout=2).status != 200)"]
CMD ["castellan", "serve"]
