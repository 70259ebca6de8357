# syntax=docker/dockerfile:1
#
# FastCache serving image: the API (`fastcache-serve`, the default command) and the GPU/CPU worker
# (`fastcache-worker`) in one image; and `api`, the light image of the API replicas of the Redis
# deployment (no torch, no diffusers, no models: the workers publish the model's limits in Redis).
#
#   CPU (default):  docker build -t fastcache-serve:cpu .
#   CUDA 12.x:      docker build --build-arg VARIANT=cuda -t fastcache-serve:cuda .
#   API replicas:   docker build --target api -t fastcache-serve:api .
#
# Every bundled model under models/ (a diffusers pipeline directory) is baked in at /app/models/<dir>;
# the default, the digits DiT at /app/models/digits-dit, serves with no download. BUNDLED_MODELS
# picks some (e.g. --build-arg BUNDLED_MODELS=digits-dit). Other models: mount a directory and set
# FASTCACHE_MODEL, or give a Hugging Face id and mount /models so HF_HOME=/models/hf-cache survives
# restarts. No registry access? deploy/docker/build-local.sh builds and smoke-tests the CPU image
# with buildah and podman from a local base image.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CUDA runtime libraries come with the torch wheel (nvidia-* packages); the base image only
# has to carry the NVIDIA container runtime settings, so the small `base` flavour is enough.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Base images, one per VARIANT: `FROM python-${VARIANT}` below picks one.
FROM ${PYTHON_IMAGE} AS python-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS python-cuda
ARG TORCH_CUDA=cu128
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3 /usr/local/bin/python
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------------
# Builder: a virtualenv with torch (CPU or CUDA wheel) and the project.
# hadolint ignore=DL3006
FROM python-${VARIANT} AS builder
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# a mirror of the variant's torch wheel index (air-gapped builds; deploy/docker/build-local.sh)
ARG TORCH_INDEX_MIRROR=""
# torch first, from the variant's index: a bare `torch` requirement would pull the default CUDA build
# hadolint ignore=DL3013
RUN pip install --upgrade pip setuptools wheel \
    && pip install --index-url "${TORCH_INDEX_MIRROR:-${TORCH_INDEX_URL}}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fastcache_core ./fastcache_core
COPY service ./service
# installs the console scripts fastcache-serve and fastcache-worker into /opt/venv/bin
RUN pip install . \
    && pip check \
    && fastcache-serve --help >/dev/null \
    && fastcache-worker --help >/dev/null

# ---------------------------------------------------------------------------------------------
# API replicas (--target api): the project without its model dependencies; every import the API
# makes in Redis mode is torch-free, which the build checks.
FROM python-cpu AS api-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/docker/api-requirements.txt ./
COPY pyproject.toml README.md ./
COPY fastcache_core ./fastcache_core
COPY service ./service
# hadolint ignore=DL3013
RUN pip install --upgrade pip setuptools wheel \
    && pip install -r api-requirements.txt \
    && pip install --no-deps . \
    && fastcache-serve --help >/dev/null \
    && python -c "import sys, service.api.app, service.queue.redis_streams, service.queue.results.s3; \
sys.exit('torch' in sys.modules)"

FROM python-cpu AS api
LABEL org.opencontainers.image.title="fastcache-serve-api" \
      org.opencontainers.image.description="API replicas of the FastCache Redis deployment (no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fastcache \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin fastcache \
    && mkdir -p /app
COPY --from=api-builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/fastcache-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    FASTCACHE_HOST=0.0.0.0 \
    FASTCACHE_PORT=8000
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# needs FASTCACHE_QUEUE=redis://...: the in-process mode loads a model, which this image cannot
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/fastcache-healthcheck"]
CMD ["fastcache-serve"]

# ---------------------------------------------------------------------------------------------
# Bundled models: every diffusers pipeline directory under models/ (one with a model_index.json;
# the Python packages next to them are training code and stay out), or only those BUNDLED_MODELS
# names (space-separated directory names).
# hadolint ignore=DL3006
FROM python-${VARIANT} AS bundled-models
ARG BUNDLED_MODELS=""
COPY deploy/docker/bundle-models.sh /usr/local/bin/bundle-models
COPY models /src/models
RUN sh /usr/local/bin/bundle-models /src/models /opt/models "${BUNDLED_MODELS}"

# ---------------------------------------------------------------------------------------------
# Runtime: the virtualenv, the bundled models, a non-root user.
# hadolint ignore=DL3006
FROM python-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="fastcache-serve" \
      org.opencontainers.image.description="HTTP image generation with FastCache-accelerated Diffusion Transformers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fastcache \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin fastcache \
    && mkdir -p /models/hf-cache /app \
    && chown -R 10001:10001 /models
COPY --from=builder /opt/venv /opt/venv
# read-only for the service user (owned by root)
COPY --from=bundled-models /opt/models /app/models
COPY deploy/docker/healthcheck.py /usr/local/bin/fastcache-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    FASTCACHE_HOST=0.0.0.0 \
    FASTCACHE_PORT=8000 \
    FASTCACHE_METRICS_PORT=9100 \
    FASTCACHE_MODEL=/app/models/digits-dit \
    HF_HOME=/models/hf-cache \
    HF_HUB_DISABLE_TELEMETRY=1 \
    FASTCACHE_IMAGE_VARIANT=${VARIANT}
WORKDIR /app
USER 10001:10001
# 8000: API (fastcache-serve); 9100: worker /metrics, /healthz, /readyz (fastcache-worker)
EXPOSE 8000 9100
# liveness of whichever process runs here: GET /healthz on FASTCACHE_PORT or FASTCACHE_METRICS_PORT;
# readiness (model loaded and warmed) is /readyz, probed by the orchestrator. The start period covers
# a worker loading a large model before it opens its port (a first success ends it early).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/fastcache-healthcheck"]
CMD ["fastcache-serve"]
