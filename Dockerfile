# One image for both dsproxy processes: `dsproxy controller` and `dsproxy serve` (the backend).
# Built from the project's own files only (.dockerignore lets nothing else in: no keys, no .env).
#
#   docker build -t dsproxy .
#   docker run --rm dsproxy --help
#
# Keys are never baked in: mount them at run time (docker-compose.yml mounts ./keys on /keys).

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY projections ./projections
COPY dsproxy ./dsproxy
# A plain install (no editable, no test extras) into a venv that the runtime stage copies whole.
RUN python -m venv /opt/dsproxy && /opt/dsproxy/bin/pip install . && /opt/dsproxy/bin/dsproxy --help

FROM python:3.11-slim

# The uid owns /data; pick the owner of your ./keys files (`--build-arg APP_UID=$(id -u)`),
# since dsproxy refuses a Nostr key file that others can read (it must stay mode 600).
ARG APP_UID=10001
RUN groupadd --system --gid "$APP_UID" dsproxy \
    && useradd --system --uid "$APP_UID" --gid dsproxy --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin dsproxy \
    && mkdir -p /data \
    && chown dsproxy:dsproxy /data

COPY --from=build /opt/dsproxy /opt/dsproxy

ENV PATH=/opt/dsproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DSPROXY_DATA_DIR=/data

USER dsproxy
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# SIGINT, not SIGTERM: both commands stop cleanly on SIGINT (`dsproxy serve` exits 0), whereas
# uvicorn re-raises a SIGTERM after its own shutdown, which can kill `dsproxy serve` (exit 143)
# before the node and its stores are closed.
STOPSIGNAL SIGINT

# No HEALTHCHECK here: only the backend listens. Its check, with no curl needed:
#   python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
ENTRYPOINT ["dsproxy"]
CMD ["--help"]
