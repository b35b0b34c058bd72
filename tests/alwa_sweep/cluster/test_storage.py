"""--storage: parsing, and a real Tune sweep writing into an S3 bucket (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alwa_sweep.storage import check_storage_writable, list_files, resolve_storage, s3_filesystem
from alwa_sweep.tracking import sqlite_uri
from trainers.errors import ConfigError
from sweep_specs import tiny_sweep_spec

TINY_SCHEDULE = {"unit": "iter", "max_iters": 8, "steps": [6], "warmup_iters": 2}


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = resolve_storage("rel/dir")
    assert storage.path == str(tmp_path / "rel" / "dir") and not storage.is_remote
    assert resolve_storage("file:///abs/x").path == "/abs/x"
    assert resolve_storage(None, default="d").path == str(tmp_path / "d")
    assert storage.join("a", "b").path == str(tmp_path / "rel" / "dir" / "a" / "b")


def test_uris_stay_uris(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = resolve_storage("s3://my-bucket/sweeps/")
    assert (s3.path, s3.display, s3.is_remote) == ("my-bucket/sweeps", "s3://my-bucket/sweeps", True)
    assert s3.join("x", "tune").path == "my-bucket/sweeps/x/tune"
    gs = resolve_storage("gs://b/p")
    assert gs.path == "gs://b/p" and gs.filesystem is None and gs.is_remote


def test_endpoint_comes_from_the_standard_variables(moto_s3, monkeypatch):
    # pyarrow's S3FileSystem() does not read AWS_ENDPOINT_URL itself: it would look
    # for the bucket on AWS. The one built here reaches the moto server.
    import pyarrow.fs as pafs

    fs = s3_filesystem()
    assert fs.get_file_info(moto_s3["bucket"]).type == pafs.FileType.Directory
    assert b"test" not in __import__("pickle").dumps(fs)  # no secret in the pickled filesystem
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="--storage: cannot write"):
        check_storage_writable(resolve_storage(f"s3://{moto_s3['bucket']}/x"))


@pytest.mark.parametrize("uri, match", [
    ("s3:/bucket/x", "single slash"),
    ("s3://", "names no bucket"),
    ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
    ("ftp://host/x", "unknown storage scheme 'ftp'"),
    ("s3://bucket/x?endpoint=y", "query or fragment"),
    ("file://otherhost/x", "file:// URIs are local"),
])
def test_malformed_storage_is_one_paragraph_naming_the_flag(uri, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_storage(uri)
    assert str(info.value).startswith("--storage: ") and "\n" not in str(info.value)


def test_missing_bucket_fails_before_anything_runs(moto_s3):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' of s3://no-such-bucket/x does not exist"):
        check_storage_writable(resolve_storage("s3://no-such-bucket/x"))
    check_storage_writable(resolve_storage(f"s3://{moto_s3['bucket']}/x"))
    # the write test cleaned up after itself (pyarrow leaves the prefix's directory marker)
    assert [k for k in moto_s3["keys"]() if not k.endswith("/")] == []


@pytest.mark.slow
def test_sweep_writes_tune_state_and_checkpoints_into_the_bucket(moto_s3, local_ray, synthetic_voc, tmp_path,
                                                                 monkeypatch):
    from alwa_sweep.spec import load_spec
    from alwa_sweep.tune import run_sweep

    monkeypatch.chdir(tmp_path)
    spec = load_spec(tiny_sweep_spec(synthetic_voc, {"weighting.method": ["none", "alwa"]}, max_concurrent=2,
                                     name="clustersweep", experiment="cluster-test", schedule=TINY_SCHEDULE,
                                     train={"checkpoint_every_iters": 2}))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    storage = f"s3://{moto_s3['bucket']}/sweeps"
    summary = run_sweep(spec, tmp_path / "runs" / "s3sweep", uri, progress=False, storage=storage)
    assert summary.line() == "ok=2"
    keys = moto_s3["keys"]("sweeps/s3sweep/tune/")
    assert any(k.endswith("tuner.pkl") for k in keys)
    assert any(Path(k).name.startswith("experiment_state") for k in keys)
    sizes = []
    for trial in spec.trials:  # the newest 2 of each trial's 4 checkpoints, only in the bucket
        prefix = f"sweeps/s3sweep/tune/{trial.key}/checkpoint_"
        stored = sorted(k for k in keys if k.startswith(prefix) and k.endswith(".pt"))
        assert [k.rsplit("/", 1)[1] for k in stored] == ["ckpt_00000006.pt", "ckpt_00000008.pt"], stored
        sizes.append(sum(moto_s3["client"].head_object(Bucket=moto_s3["bucket"], Key=k)["ContentLength"]
                         for k in stored))
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pt.tmp"))  # no local copy left
    print(f"\ncheckpoint bytes per trial in the bucket (keep_checkpoints=2): {sizes}")
    assert not list(tmp_path.rglob("s3:*")) and not (tmp_path / "s3:").exists()
    state = json.loads((tmp_path / "runs" / "s3sweep" / "sweep.json").read_text())
    assert state["storage"] == storage
    assert list_files(resolve_storage(storage).join("s3sweep", "tune"))  # readable through the same API
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("cluster-test").experiment_id])
    trials = [r for r in runs if r.data.tags.get("alwa.kind") == "trial"]
    assert len(trials) == 2
    for run in trials:  # each trial's output went to the bucket and into its MLflow run
        assert any(k.endswith(f"/{run.data.tags['alwa.trial_key']}/stdout.log") for k in keys)
        logs = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "logs")}
        assert {"logs/stdout.log", "logs/stderr.log"} <= logs, logs
