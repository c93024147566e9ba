# gpt-oss-server on an NVIDIA GPU.
#
#   docker build -t gpt-oss-server .
#   docker run --gpus all -p 8000:8000 -v gpt-oss-cache:/cache gpt-oss-server --model openai/gpt-oss-20b
#
# With no --model (and no GPT_OSS_MODEL) it serves the random-weight demo, as the README's first command does.
# Models downloaded from Hugging Face and the demo checkpoint land in the /cache volume, so a restarted
# container does not download or build them again.

# The CUDA runtime matching the torch wheel below (TORCH_CUDA); the host driver must support it.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

# The torch version is the README's (the one the test suite runs on), so the image runs the code that was
# tested; only the build differs: the README installs the CPU build, the image the CUDA build of that same
# version from PyTorch's index for TORCH_CUDA. Both are inside pyproject's `torch>=2.6,<2.14`.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's python3 (3.12) and venv; versions left to the base image's release (pinning Debian revisions
# breaks the build whenever Ubuntu publishes a security update).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A non-root user; /cache is its model cache (a volume), created here so a fresh named volume inherits the
# ownership.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /cache/gpt-oss-server /cache/huggingface \
    && chown -R app:app /cache

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The README's install (a venv, torch==2.13.0, then `pip install -e .`), in two layers so that editing the
# code does not download torch again: first the venv and torch (the CUDA build here, the CPU one there), ...
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" --extra-index-url https://pypi.org/simple

WORKDIR /app
COPY pyproject.toml README.md ./
COPY harmony/ harmony/
COPY engine/ engine/
COPY model/ model/
COPY server/ server/
COPY tools/ tools/
# ... then the project itself exactly as the README does; torch is already satisfied, so nothing else of
# torch's is installed here.
RUN /opt/venv/bin/pip install --no-cache-dir -e .

# Listen on every interface inside the container; the demo checkpoint and Hugging Face downloads go to the
# volume.
ENV GPT_OSS_HOST=0.0.0.0 \
    GPT_OSS_PORT=8000 \
    GPT_OSS_CACHE_DIR=/cache/gpt-oss-server \
    HF_HOME=/cache/huggingface
VOLUME ["/cache"]
EXPOSE 8000

# The numeric id (the `app` user above), so Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001

# /health is 200 once the model is loaded and 503 while loading; urllib raises on a 503 (exit 1), and no curl
# is needed in the image. The start period covers a first download of a large model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GPT_OSS_PORT', '8000'), timeout=4)"]

# Flags after the image name go to the server: `docker run ... gpt-oss-server --model openai/gpt-oss-20b`.
ENTRYPOINT ["gpt-oss-server"]
CMD []
