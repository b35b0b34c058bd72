"""Real cluster infrastructure on loopback for the cluster tests.

- ``moto_s3``: an S3-compatible server (``moto_server`` from ``moto[server]``) on a
  free port, with a fresh bucket and the standard AWS variables (``AWS_ENDPOINT_URL``,
  keys, region) set for the test; stopped in teardown.
- ``ray_cluster``: a real 2-node Ray cluster (``ray.cluster_utils.Cluster``): a 1-CPU
  head and a 1-CPU worker node carrying the custom resource ``worker: 1``; the test
  process is connected as a driver.
- ``mlflow_server``: ``mlflow server`` on a SQLite file in a tmp dir, on loopback.

``local_ray`` (a local single-node runtime) comes from ``tests/alwa_sweep/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import free_port, stop, wait_http

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    exe = shutil.which("moto_server", path=str(BIN)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server is missing: pip install 'moto[server]' (dev extras)")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", 30, proc)
        yield url
    finally:
        stop(proc)
        log.close()


@pytest.fixture
def moto_s3(moto_server, monkeypatch, request):
    """A fresh bucket on the moto server, with the AWS variables pointing at it."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"alwa-{abs(hash(request.node.nodeid)) % 10**8:08d}"
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)

    def keys(prefix: str = "") -> list[str]:
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [o["Key"] for o in page.get("Contents", [])]
        return found

    return {"endpoint": moto_server, "bucket": bucket, "client": client, "keys": keys}


@pytest.fixture(scope="module")
def ray_cluster():
    """A real 2-node cluster: head (1 CPU) + worker node (1 CPU, ``worker: 1``).

    Its temp dir is private (``RAY_TMPDIR``): ``Cluster`` records its address in
    ``<tmp>/ray/ray_current_cluster``, which a plain ``ray.init()`` elsewhere on a shared
    machine would otherwise join."""
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        ray.shutdown()
    old_tmp = os.environ.get("RAY_TMPDIR")
    private_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: unix socket paths
    os.environ["RAY_TMPDIR"] = private_tmp
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, resources={"worker": 1})
    cluster.wait_for_nodes()
    try:
        yield {"cluster": cluster, "address": cluster.address, "worker": worker, "tmp": private_tmp}
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
        shutil.rmtree(private_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=log, cwd=folder, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 60, proc)
        yield url
    finally:
        stop(proc)
        log.close()
