# syntax=docker/dockerfile:1
#
# royalti-auth-proxy: the authenticating reverse-proxy sidecar as a container image.
#
#   make image                                 # docker, else podman; see deploy/README.md
#   docker build -t royalti-auth-proxy:0.1.0 .   # the same by hand
#   docker build --build-arg EXTRAS=fast ...     # with uvloop (see deploy/README.md)
#
# Stage 1 builds the wheel and installs it, with its dependencies, into a virtual environment;
# stage 2 is a clean slim Python with that environment copied in, no compiler, no source tree.
# The running container writes nothing: it works with a read-only root filesystem
# (docker run --read-only, Kubernetes readOnlyRootFilesystem: true). See deploy/README.md.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the tree out of the context).
COPY pyproject.toml README.md ./
COPY proxy ./proxy

# Optional extras, comma-separated: none by default. --build-arg EXTRAS=fast adds uvloop, which
# the proxy uses only when asked to (event_loop: uvloop, or ROYALTI_PROXY_LOOP=uvloop); without
# it, uvloop would be dead weight in the image.
ARG EXTRAS=""
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/royalti-proxy \
 && /opt/royalti-proxy/bin/pip install "$(ls /wheels/royalti_auth_proxy-*.whl)${EXTRAS:+[$EXTRAS]}" \
 && /opt/royalti-proxy/bin/pip uninstall --yes pip setuptools \
 && /opt/royalti-proxy/bin/python -m compileall -q /opt/royalti-proxy/lib
# (compileall: the .pyc files are written now, since the root filesystem is read-only later.)

FROM python:${PYTHON_VERSION}-slim-bookworm

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="royalti-auth-proxy" \
      org.opencontainers.image.description="Authenticating reverse-proxy sidecar for the Royalti.io API and plain OAuth2 APIs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="deploy/README.md"

# Nothing is written at run time: no .pyc files (they were compiled at build time), no buffered
# output, and the configuration comes from the image.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/royalti-proxy/bin:$PATH

COPY --from=build /opt/royalti-proxy /opt/royalti-proxy
# The default configuration: one Royalti upstream, set up from ROYALTI_* variables and files
# under /run/secrets. Mount another file over it (a ConfigMap, a compose config) to change it.
COPY deploy/docker/config.yaml /etc/royalti-proxy/config.yaml

# A numeric user, so that runAsNonRoot can verify it without an /etc/passwd entry.
USER 10001:10001

# 8080: the proxy (loopback unless configured otherwise); 9090: admin (/livez, /readyz, /metrics).
EXPOSE 8080 9090

# No curl in a slim image: the interpreter that is already there asks /livez.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/livez', timeout=2).status == 200 else 1)"]

# SIGTERM drains requests in flight (shutdown_timeout, 25 s by default) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["royalti-proxy"]
CMD ["run", "--config", "/etc/royalti-proxy/config.yaml"]
