# syntax=docker/dockerfile:1
#
# Image of the DINO service: the `dino` CLI, Ray (head, worker and job submitter under KubeRay),
# PyTorch. Build: docker build -t ghcr.io/example/dino-service:0.1.0 .
#
# Base: the CUDA "base" flavour (cudart + driver compat libs, ~150 MB). The PyPI torch wheel ships
# its own CUDA 13 runtime, cuBLAS and cuDNN, so a cudnn-runtime base would carry them twice.
# CUDA 13 matches that wheel: GPU nodes need an NVIDIA driver >= 580. Ubuntu 24.04's Python is
# 3.12, which torch, Ray and MLflow all support.

# ---- python: the interpreter and the unprivileged user, shared by both stages below ----------
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS python

# The base tag pins the Ubuntu release; inside a release apt only ships security fixes, and
# superseded versions leave the archive, so exact apt pins would break rebuilds (DL3008).
# ubuntu:24.04 images own uid 1000 as `ubuntu`: remove it so that uid 1000 is `ray`, as in
# rayproject/ray images (`useradd` fails loudly if the uid is still taken).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home --shell /bin/bash ray

# A virtual environment keeps pip away from Ubuntu's externally managed Python (PEP 668).
# KubeRay starts Ray through bash, possibly as a login shell (`bash -lc`): Ubuntu's /etc/profile
# leaves PATH alone, so `ray` stays on it (a Debian base would reset PATH there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- deps: third-party packages only, so a code change does not re-download torch and Ray ----
FROM python AS deps
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -m venv /opt/venv \
    && python3 -c 'import tomllib; d = tomllib.load(open("/tmp/pyproject.toml", "rb")); print("\n".join(d["project"]["dependencies"]))' > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# ---- runtime ----------------------------------------------------------------------------------
FROM python AS runtime
LABEL org.opencontainers.image.title="dino-service" \
      org.opencontainers.image.description="DINO self-supervised ViT pretraining on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

# The ~6 GB dependency layer is rebuilt only when pyproject.toml changes, so registries and nodes
# keep reusing it; a code change only replaces the small layer below. The source is bind-mounted
# (rw: setuptools writes build/ and *.egg-info, discarded afterwards), so none of it is copied in.
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,source=.,target=/tmp/src,rw \
    pip install --no-cache-dir /tmp/src

# Ray phones home with usage stats by default; training clusters often have no egress.
ENV RAY_USAGE_STATS_ENABLED=0

# Numeric user: Kubernetes can only check runAsNonRoot against a numeric USER.
USER 1000:1000
WORKDIR /home/ray

# KubeRay sets `command` (bash -c "...; ray start ...") on head, worker, autoscaler and job
# submitter containers, which replaces this entrypoint. Plain Docker: `docker run IMAGE train
# --preset quickstart`, or `docker run --entrypoint ray IMAGE start --head --block`.
ENTRYPOINT ["dino"]
CMD ["--help"]
