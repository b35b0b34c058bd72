"""Sweeps as Ray Jobs: submit to a real head with its dashboard, then status and logs."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from types import SimpleNamespace

import pytest

from alwa_sweep.cli import main
from alwa_sweep.commands.jobs import dashboard_address, driver_arguments, submit
from trainers.errors import ConfigError

from cluster_helpers import free_port, tiny_spec_file as _spec, wait_http


def test_dashboard_address_forms(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert dashboard_address("head") == "http://head:8265"
    assert dashboard_address("https://head:443") == "https://head:443"
    for bad, words in [(None, "needs the cluster's dashboard"), ("ray://h:10001", "Ray Client"),
                       ("h:abc", "not a dashboard address")]:
        with pytest.raises(ConfigError, match=words):
            dashboard_address(bad)


def test_driver_arguments_drop_local_flags():
    args = SimpleNamespace(tracking_uri="http://mlflow:5000", max_concurrent=2, storage="s3://b/p", runs_dir=None,
                           overrides=["train.seed=1"], no_check_paths=True)
    assert driver_arguments(args, "sw") == ["spec.yaml", "--name", "sw", "--tracking-uri", "http://mlflow:5000",
                                            "--max-concurrent", "2", "--storage", "s3://b/p", "--set",
                                            "train.seed=1", "--no-check-paths", "--quiet"]


def test_unreachable_dashboard_is_one_paragraph(capsys, tmp_path):
    start = time.monotonic()
    assert main(["status", "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --address: cannot reach the Ray dashboard") and "\n" not in err
    assert main(["run", _spec(tmp_path), "--submit", "--address", "127.0.0.1:1", "--no-check-paths"]) == 2
    assert time.monotonic() - start < 15


@pytest.fixture(scope="module")
def head_with_dashboard():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    old_tmp = os.environ.get("RAY_TMPDIR")
    private_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    os.environ["RAY_TMPDIR"] = private_tmp
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        cluster.shutdown()
        os.environ.pop("RAY_TMPDIR") if old_tmp is None else os.environ.__setitem__("RAY_TMPDIR", old_tmp)
        shutil.rmtree(private_tmp, ignore_errors=True)


@pytest.mark.slow
def test_submitted_command_runs_on_the_cluster_and_its_logs_come_back(head_with_dashboard, tmp_path, capsys):
    wait_http(f"{head_with_dashboard}/api/version", 60)
    spec = _spec(tmp_path)
    job = submit(head_with_dashboard, ["validate", "spec.yaml"], f"alwa-validate-{os.getpid()}",
                 __import__("pathlib").Path(spec), install="image")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        capsys.readouterr()
        assert main(["status", job, "--address", head_with_dashboard]) == 0
        line = capsys.readouterr().out
        if "SUCCEEDED" in line or "FAILED" in line:
            break
        time.sleep(1)
    assert f"{job}  SUCCEEDED" in line, line
    assert main(["logs", job, "--address", head_with_dashboard]) == 0
    out = capsys.readouterr().out
    assert "trials: 1" in out  # `alwa-sweep validate` ran on the cluster, on the shipped spec
    assert main(["status", "--address", head_with_dashboard]) == 0
    assert job in capsys.readouterr().out
