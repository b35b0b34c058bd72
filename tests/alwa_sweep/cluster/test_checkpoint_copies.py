"""One copy of each checkpoint: a sweep trial's checkpoints exist only where Tune (or
Train) stores them, ``keep_checkpoints`` of them, and a restart reads them from there.

The bytes per trial are printed (``pytest -s``) and asserted: stored = keep × one
checkpoint; at peak, while Tune persists a new one, the engine's hand-off folder and
Tune's new copy exist before Tune removes its oldest (keep + 2).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from alwa_sweep.tracking import sqlite_uri
from sweep_specs import tiny_sweep_spec

KEEP = 2
ITERS, EVERY = 16, 4  # checkpoints at 4, 8, 12, 16 (the end of the one epoch)


def checkpoint_files(root: Path) -> list[Path]:
    return [Path(folder, name) for folder, _, names in os.walk(root) for name in names
            if name.endswith((".pt", ".pt.tmp"))]  # ckpt_*.pt, and one being written


class CheckpointWatcher:
    """Polls a folder tree for checkpoint files; the most seen at once per trial key."""

    def __init__(self, root: Path, keys: list[str], period: float = 0.01):
        self.root, self.keys, self.period = root, keys, period
        self.peak_files: dict[str, int] = defaultdict(int)
        self.peak_bytes: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            files, sizes = defaultdict(int), defaultdict(int)
            for path in checkpoint_files(self.root):
                key = next((k for k in self.keys if k in path.parts), None)
                try:
                    size = path.stat().st_size
                except OSError:  # removed between listing and stat
                    continue
                if key is not None:
                    files[key] += 1
                    sizes[key] += size
            for key in files:
                self.peak_files[key] = max(self.peak_files[key], files[key])
                self.peak_bytes[key] = max(self.peak_bytes[key], sizes[key])
            time.sleep(self.period)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@pytest.mark.slow
def test_local_sweep_stores_each_checkpoint_once(local_ray, synthetic_voc, tmp_path, capsys):
    from alwa_sweep.spec import load_spec
    from alwa_sweep.tune import run_sweep

    spec = load_spec(tiny_sweep_spec(synthetic_voc, {"weighting.method": ["none", "alwa"]}, max_concurrent=2,
                                     keep_checkpoints=KEEP, train={"checkpoint_every_iters": EVERY}))
    keys = [t.key for t in spec.trials]
    sweep_dir = tmp_path / "runs" / "copies"
    with CheckpointWatcher(tmp_path, keys) as watcher:
        summary = run_sweep(spec, sweep_dir, sqlite_uri(tmp_path / "mlflow.db"), progress=False)
    assert summary.line() == "ok=2"
    lines = []
    for key in keys:
        stored = sorted(checkpoint_files(sweep_dir / "tune" / key))
        # the newest KEEP of the 4, one file each, in Tune's checkpoint_NNNNNN folders
        assert [p.name for p in stored] == ["ckpt_00000012.pt", "ckpt_00000016.pt"], stored
        assert all(p.parent.name.startswith("checkpoint_") for p in stored)
        assert checkpoint_files(sweep_dir / "trials" / key) == []  # the engine kept none
        one = stored[-1].stat().st_size
        total = sum(p.stat().st_size for p in stored)
        assert total == pytest.approx(KEEP * one, rel=0.01)
        # at most: Tune's KEEP + the one it is persisting + the engine's hand-off folder
        assert watcher.peak_files[key] <= KEEP + 2, watcher.peak_files[key]
        lines.append(f"trial {key}: stored {total:,} bytes = {len(stored)} x {_mib(one)}; peak seen "
                     f"{watcher.peak_files[key]} files, {watcher.peak_bytes[key]:,} bytes "
                     f"({watcher.peak_bytes[key] / one:.2f} checkpoints)")
    every_file = checkpoint_files(tmp_path)
    assert len(every_file) == KEEP * len(keys), every_file  # nowhere else in the sweep's tree
    with capsys.disabled():
        print("\ncheckpoint bytes per trial (local storage, keep_checkpoints=2):\n  " + "\n  ".join(lines))


@pytest.mark.slow
def test_restart_from_a_bucket_downloads_once_and_falls_back(moto_s3, tmp_path):
    """A restarted trial on S3 storage: the newest stored checkpoint is corrupt, so the
    previous one is downloaded, loaded, and its local copy deleted once released."""
    import pyarrow.fs as pafs
    import torch
    from ray import tune

    from alwa_sweep.storage import resolve_storage
    from alwa_sweep.trial import RestoredCheckpoint
    from trainers.checkpoint import load_latest_checkpoint, save_checkpoint

    storage = resolve_storage(f"s3://{moto_s3['bucket']}/sweeps").join("s", "tune", "trial")
    for n, iteration in enumerate((10, 20)):
        local = tmp_path / f"checkpoint_{n:06d}"
        save_checkpoint({"w": torch.full((1000,), float(iteration)), "iteration": iteration}, local, iteration)
        pafs.copy_files(str(local), f"{storage.path}/{local.name}", destination_filesystem=storage.filesystem)
    newest = f"sweeps/s/tune/trial/checkpoint_000001/ckpt_00000020.pt"
    body = moto_s3["client"].get_object(Bucket=moto_s3["bucket"], Key=newest)["Body"].read()
    moto_s3["client"].put_object(Bucket=moto_s3["bucket"], Key=newest, Body=body[: len(body) // 2])

    checkpoint = tune.Checkpoint(f"{storage.path}/checkpoint_000001", filesystem=storage.filesystem)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint .*checkpoint_000001"):
        restored = RestoredCheckpoint(lambda: checkpoint)
    assert restored.folder is not None and restored.folder.is_dir()
    assert not str(restored.folder).startswith(str(tmp_path))  # a download, not the files written above
    state, path = load_latest_checkpoint(restored.folder)
    assert state["iteration"] == 10 and path.name == "ckpt_00000010.pt"
    restored.release()
    assert not restored.folder.exists()  # the downloaded copy is gone once the engine has loaded it
    assert len(moto_s3["keys"]("sweeps/s/tune/trial/")) == 4  # the bucket is untouched
