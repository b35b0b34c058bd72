"""Preflight: every failure before any MLflow state exists — exit 2, one paragraph,
nothing created, in seconds — and the trial-fit check against a real 2-node cluster."""

from __future__ import annotations

import http.server
import io
import threading
import time

import pytest

from alwa_sweep.cli import main
from cluster_helpers import tiny_spec_file
from alwa_sweep.preflight import (available_per_node, before_sweep, check_store_for_cluster, check_trial_fits,
                                  parse_address, probe_address)
from alwa_sweep.storage import resolve_storage
from alwa_sweep.tracking import sqlite_uri
from trainers.errors import ConfigError

SECONDS = 30


_spec = tiny_spec_file


def _run_fails(capsys, tmp_path, *args, field):
    start = time.monotonic()
    runs = tmp_path / "runs"
    code = main(["run", args[0], "--runs-dir", str(runs), "--no-check-paths", "--quiet", "--name", "x", *args[1:]])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert seconds < SECONDS
    assert err.startswith(f"error: {field}") and "\n" not in err and "Traceback" not in err, err
    assert not (runs / "mlflow.db").exists() and not (runs / "sweeps").exists()  # nothing created
    return err


@pytest.fixture(scope="module")
def not_ray_port():
    """A port that answers but is not Ray: a plain HTTP server (like the dashboard's 8265)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("address, field, words", [
    ("localhost:abc", "--address", "port 'abc'"),
    ("http://head:8265", "--address", "scheme 'http'"),
    ("127.0.0.1:1", "--address", "cannot reach the Ray cluster at 127.0.0.1:1"),
])
def test_bad_addresses_fail_fast(capsys, tmp_path, address, field, words):
    err = _run_fails(capsys, tmp_path, _spec(tmp_path), "--address", address, field=field)
    assert words in err


def test_ray_address_variable_is_checked_too(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    err = _run_fails(capsys, tmp_path, _spec(tmp_path), field="RAY_ADDRESS")
    assert "cannot reach" in err


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_port_that_is_not_ray_fails_in_seconds(capsys, tmp_path, not_ray_port, scheme):
    # plain ray.init waits > 40 s here (GCS) or 30 s (Ray Client) before it gives up
    err = _run_fails(capsys, tmp_path, _spec(tmp_path), "--address", f"{scheme}127.0.0.1:{not_ray_port}",
                     field="--address")
    assert "answers but is not a Ray" in err


def test_probe_time_is_bounded(not_ray_port):
    start = time.monotonic()
    with pytest.raises(ConfigError):
        probe_address(parse_address(f"ray://127.0.0.1:{not_ray_port}"), timeout=1.0)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("storage, words", [("s3:/bucket/x", "single slash"),
                                            ("s3://no-such-bucket-here/x", "does not exist")])
def test_bad_storage_fails_before_anything(capsys, tmp_path, moto_s3, storage, words):
    err = _run_fails(capsys, tmp_path, _spec(tmp_path), "--storage", storage, field="--storage")
    assert words in err


# ---------------------------------------------------------------- on a real 2-node cluster


def test_a_trial_that_can_never_fit_names_the_field(capsys, tmp_path, ray_cluster):
    err = _run_fails(capsys, tmp_path, _spec(tmp_path, {"cpus_per_worker": 1, "gpus_per_worker": 1}),
                     "--address", ray_cluster["address"], field="resources.gpus_per_worker")
    assert "the largest with CPU=1" in err and "2 alive node(s)" in err


def test_sqlite_store_refused_on_a_multi_node_cluster(capsys, tmp_path, ray_cluster):
    err = _run_fails(capsys, tmp_path, _spec(tmp_path), "--address", ray_cluster["address"],
                     "--tracking-uri", sqlite_uri(tmp_path / "store" / "mlflow.db"), field="--tracking-uri")
    assert "mlflow server" in err and "2 nodes" in err
    assert not (tmp_path / "store").exists()


def test_fit_against_the_real_cluster(ray_cluster, mlflow_server, tmp_path):
    import ray

    out = io.StringIO()
    info = before_sweep(ray_cluster["address"], resources={"cpus_per_worker": 1}, tracking_uri=mlflow_server,
                        out=out, err=out)
    try:
        assert len(info.nodes) == 2 and "2 node(s)" in out.getvalue()
        nodes = ray.nodes()
        assert check_trial_fits({"cpus_per_worker": 1, "resources_per_worker": {"worker": 1}}, nodes).fits
        # 2 workers × 0.5 CPU plus the 1-CPU Train driver: only across both nodes
        assert check_trial_fits({"workers": 2, "cpus_per_worker": 0.5}, nodes).fits
        with pytest.raises(ConfigError, match=r"^resources\.workers: 2 workers need as many distinct nodes"):
            check_trial_fits({"workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"}, nodes)
        with pytest.raises(ConfigError, match=r"^resources\.resources_per_worker\.worker: 2 worker per worker"):
            check_trial_fits({"cpus_per_worker": 1, "resources_per_worker": {"worker": 2}}, nodes)
        with pytest.raises(ConfigError, match=r"^resources\.accelerator_type: no node has accelerator type 'H100'"):
            check_trial_fits({"cpus_per_worker": 1, "accelerator_type": "H100"}, nodes)

        # fits, but the worker node is busy now: a warning that the trial waits
        @ray.remote(num_cpus=1, resources={"worker": 1})
        class Holder:
            def ping(self):
                return 1

        holder = Holder.remote()
        ray.get(holder.ping.remote())
        deadline = time.monotonic() + 10
        while available_per_node() and time.monotonic() < deadline:
            if all(v.get("worker", 0) < 1 for v in available_per_node().values()):
                break
            time.sleep(0.2)
        err = io.StringIO()
        report = check_trial_fits({"cpus_per_worker": 1, "resources_per_worker": {"worker": 1}}, ray.nodes(),
                                  available_per_node(), out=err)
        assert report.fits and not report.fits_now and "trials wait" in err.getvalue()
        ray.kill(holder)
        # a SQLite file on the shared storage folder is accepted
        shared = resolve_storage(tmp_path / "shared")
        check_store_for_cluster(sqlite_uri(tmp_path / "shared" / "mlflow.db"), nodes, shared)
    finally:
        ray.shutdown()


def _node(node_id, ip, **resources):
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": ip, "Resources": resources}


def test_fit_places_the_train_driver_where_it_leaves_room_for_the_workers():
    gpu_node = _node("b", "10.0.0.2", CPU=2.0, GPU=2.0)
    cpu_node = _node("a", "10.0.0.1", CPU=4.0)
    strict = {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1, "placement_strategy": "STRICT_PACK"}
    # the 1-CPU driver can't sit on the GPU node (2 workers need both its CPUs): it goes on the CPU node
    assert check_trial_fits(strict, [gpu_node, cpu_node]).fits
    with pytest.raises(ConfigError, match=r"^resources\.workers: 2 workers must share one node"):
        check_trial_fits(strict, [gpu_node])
    # PACK may spread 4 one-GPU workers over two 2-GPU nodes; STRICT_PACK may not
    two = [_node("b", "10.0.0.2", CPU=8.0, GPU=2.0), _node("c", "10.0.0.3", CPU=8.0, GPU=2.0)]
    assert check_trial_fits({"workers": 4, "cpus_per_worker": 2, "gpus_per_worker": 1}, two).fits
    with pytest.raises(ConfigError, match="STRICT_PACK"):
        check_trial_fits({"workers": 4, "cpus_per_worker": 2, "gpus_per_worker": 1,
                          "placement_strategy": "STRICT_PACK"}, two)
    with pytest.raises(ConfigError, match=r"^resources\.placement_strategy: unknown value 'TIGHT'"):
        check_trial_fits({"workers": 2, "placement_strategy": "tight"}, two)


def test_loopback_tracking_server_refused_only_across_hosts():
    same_host = [_node("a", "10.0.0.1", CPU=1.0), _node("b", "10.0.0.1", CPU=1.0)]
    check_store_for_cluster("http://127.0.0.1:5000", same_host)
    with pytest.raises(ConfigError, match=r"^--tracking-uri: 'http://127.0.0.1:5000' is a loopback address"):
        check_store_for_cluster("http://127.0.0.1:5000", [same_host[0], _node("c", "10.0.0.2", CPU=1.0)])
    check_store_for_cluster("sqlite:////tmp/x/mlflow.db", same_host[:1])  # one node: fine
