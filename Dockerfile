# One image for the API and the workers: `hpsearch serve ...`, `hpsearch worker ...`, `hpsearch db upgrade`.
#
# CPU (default):
#   docker build -t hpsearch:latest .
# CUDA: a CUDA base whose Ubuntu ships Python >= 3.11 (24.04 has 3.12) and the PyTorch wheel index of the
# same CUDA version (https://pytorch.org/get-started/locally/ lists the indexes for each torch release):
#   docker build -t hpsearch:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The CUDA wheels of PyTorch carry their own CUDA libraries, so the small `-base-` image is enough; the
# host needs the NVIDIA driver and the NVIDIA Container Toolkit.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: the base image plus a Python >= 3.11 with venv -----------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# python:* images have Python already; CUDA (Ubuntu) images get the distribution's.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import sys; assert sys.version_info >= (3, 11), 'hpsearch needs Python >= 3.11, the base has ' + sys.version"

# ---- builder: a virtual environment with torch, hpsearch and its dependencies ---------------------------
FROM base AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# requirements.lock's torch version (tests/test_lock.py checks that they agree).
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/hpsearch
ENV PATH=/opt/hpsearch/bin:$PATH
# torch first, from its own index, in a layer of its own: it is the big one and changes least. It is the one
# package installed by version alone: the lock hashes the CPU wheel, and a CUDA image needs that version's
# CUDA build (whose CUDA libraries torch itself pins exactly).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
# Everything else at the lock's versions. The lock also holds the test tools, so it serves as constraints
# (without its hashes, which pip only takes for a fully pinned install) on what the image needs: hpsearch,
# its gpu extra (nvidia-ml-py feeds the GPU panels of /metrics; pure Python, idle where there is no driver),
# and the torch already installed, whose own dependencies move to the locked versions.
RUN sed -e '/--hash=/d' -e 's/ *\\$//' -e '/^torch==/d' requirements.lock > /tmp/pins.txt \
    && pip install -c /tmp/pins.txt ".[gpu]" "torch==${TORCH_VERSION}" \
    && pip check \
    && python -c "import torch, app.cli, workers.supervisor; print('torch', torch.__version__)"

# ---- runtime: the venv on a clean base, an unprivileged user --------------------------------------------
FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" hpsearch \
    && useradd --system --uid "${UID}" --gid hpsearch --home-dir /var/lib/hpsearch --no-create-home \
       --shell /usr/sbin/nologin hpsearch \
    && install -d -o hpsearch -g hpsearch /var/lib/hpsearch
COPY --from=builder /opt/hpsearch /opt/hpsearch
ENV PATH=/opt/hpsearch/bin:$PATH \
    HPSEARCH_HOME=/var/lib/hpsearch \
    HPSEARCH_LOG_JSON=true \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER hpsearch
WORKDIR /var/lib/hpsearch
EXPOSE 8000
# For `serve`; worker containers turn it off (docker run --no-healthcheck, or `healthcheck: disable` in compose).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["hpsearch"]
# Alone, the image is the one-container service: API and workers on SQLite in the /var/lib/hpsearch volume.
# docker-compose.yml runs the API without workers and the workers as their own containers.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
