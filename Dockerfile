# alwa-sweep on a CUDA image: what every node of a GPU cluster runs (examples/cluster.yaml).
#   docker build -t alwa-sweep:0.1.0 .
#   docker run --gpus all --rm alwa-sweep:0.1.0 alwa-sweep --version
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3-pip git openssh-client rsync sudo curl awscli \
    && rm -rf /var/lib/apt/lists/*

# The cluster launcher runs commands as user "ray" with passwordless sudo.
RUN useradd -m -s /bin/bash ray && echo "ray ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/ray
RUN python3.11 -m venv /opt/venv && chown -R ray /opt/venv
ENV PATH=/opt/venv/bin:$PATH

USER ray
WORKDIR /home/ray
# Dependencies first (a layer kept while only the code changes). torch's Linux x86_64
# wheels from the default index bundle CUDA; the image's driver comes from the host.
COPY --chown=ray pyproject.toml README.md ./alwa-src/
RUN pip install --upgrade pip && \
    pip install "torch>=2.2,<=2.14.1" "torchvision>=0.17,<=0.29.1" && \
    pip install "ray[default,tune,train]>=2.40" "mlflow>=3" boto3 pyarrow
COPY --chown=ray alwa_sweep ./alwa-src/alwa_sweep
COPY --chown=ray trainers ./alwa-src/trainers
COPY --chown=ray reports ./alwa-src/reports
COPY --chown=ray search_spaces ./alwa-src/search_spaces
RUN pip install ./alwa-src && mkdir -p /home/ray/mlflow /home/ray/alwa_runs

CMD ["alwa-sweep", "--help"]
