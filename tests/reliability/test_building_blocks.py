"""The reliability building blocks, each on its own: folder locks and signals with real
processes, checkpoint write failures, image-file checks, bounded CLI numbers.

(``test_properties.py`` holds the generated-input tests of the same pieces.)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, *args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


# ------------------------------------------------------------------------------ locks
HOLDER = """
    import sys, time
    from pathlib import Path
    from alwa_sweep.locks import FolderLock
    lock = FolderLock(sys.argv[1], what="sweep folder", command=["alwa-sweep", "run", "s.yaml"]).acquire()
    Path(sys.argv[2]).write_text("locked")
    time.sleep(120)
"""


def test_second_writer_fails_at_once_naming_the_holder_and_sigkill_releases(tmp_path, figures):
    from alwa_sweep.locks import FolderLock, FolderLockedError, read_holder
    from trainers.errors import ConfigError

    folder = tmp_path / "sweep"
    holder = _python(HOLDER, folder, tmp_path / "ready")
    try:
        _wait_for(tmp_path / "ready")
        info = read_holder(folder)
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert info["command"] == "alwa-sweep run s.yaml" and info["started"]

        started = time.perf_counter()
        with pytest.raises(FolderLockedError) as caught:
            FolderLock(folder, what="sweep folder").acquire()
        waited = time.perf_counter() - started
        assert waited < 0.5  # fails at once, never waits for the holder
        message = str(caught.value)
        assert isinstance(caught.value, ConfigError) and caught.value.where == str(folder)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert "alwa-sweep run s.yaml" in message and f"kill {holder.pid}" in message
        assert "\n" not in message

        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
        assert holder.wait(timeout=10) == -signal.SIGKILL
        with FolderLock(folder, what="sweep folder") as lock:
            assert lock.held and read_holder(folder)["pid"] == os.getpid()
        assert read_holder(folder) == {}  # released: the file no longer names a holder
        figures.add_row("building_blocks", {
            "piece": "alwa_sweep.locks.FolderLock",
            "input": "a second writer while a real process holds the folder; then the holder SIGKILLed",
            "result": f"refused in {waited * 1000:.1f} ms naming pid and host; after SIGKILL the lock was free "
                      "at once (no stale lock)"})
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lock_is_released_on_exit_and_conflicts_within_one_process(tmp_path):
    from alwa_sweep.locks import FolderLock, FolderLockedError

    first = FolderLock(tmp_path, what="work folder").acquire()
    with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
        FolderLock(tmp_path).acquire()
    first.release()
    first.release()  # twice is harmless
    with FolderLock(tmp_path):
        pass
    # A holder that exits normally (without releasing) frees the lock too.
    child = _python("""
        import sys
        from alwa_sweep.locks import FolderLock
        FolderLock(sys.argv[1]).acquire()
        print("held")
    """, tmp_path)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0 and out.strip() == "held", err
    with FolderLock(tmp_path):
        pass


def test_lock_in_an_unwritable_place_is_a_config_error(tmp_path):
    from alwa_sweep.locks import FolderLock
    from trainers.errors import ConfigError

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the lock file"):
        FolderLock(afile / "sub").acquire()


# ---------------------------------------------------------------------------- signals
SIGNALLED = """
    import json, os, signal, sys, time
    from pathlib import Path
    from alwa_sweep.signals import Terminated, terminate_on_signals, terminating
    folder = Path(sys.argv[1])
    record = {}
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with terminate_on_signals():
            with terminate_on_signals():  # nested: the signal is raised once
                try:
                    (folder / "ready").write_text("1")
                    time.sleep(60)
                    record["slept"] = True
                finally:
                    # The cleanup: a second signal arrives while it runs and must not abort it.
                    record["pending"] = str(terminating())
                    (folder / "cleaning").write_text("1")
                    deadline = time.monotonic() + 10
                    while terminating().repeats == 0 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    time.sleep(0.1)
                    record["cleanup_finished"] = True
    except Terminated as exc:
        record.update(signal=exc.signal_name, reason=exc.reason, repeats=exc.repeats,
                      exit_code=exc.exit_code,
                      restored=all(signal.getsignal(s) == h for s, h in before.items()),
                      state_reset=terminating() is None)
        (folder / "record.json").write_text(json.dumps(record))
        sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_raises_terminated_cleanup_survives_a_second_one(signum, tmp_path, figures):
    child = _python(SIGNALLED, tmp_path)
    try:
        _wait_for(tmp_path / "ready")
        child.send_signal(signum)
        _wait_for(tmp_path / "cleaning")
        child.send_signal(signal.SIGINT)  # Ctrl-C again, during the cleanup
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    name = signal.Signals(signum).name
    assert child.returncode == 128 + signum, err
    record = json.loads((tmp_path / "record.json").read_text())
    assert record == {"pending": f"terminated by {name}", "cleanup_finished": True, "signal": name,
                      "reason": f"terminated by {name}", "repeats": 1, "exit_code": 128 + signum,
                      "restored": True, "state_reset": True}
    assert "received again" in err and "Traceback" not in err
    figures.add_row("building_blocks", {
        "piece": "alwa_sweep.signals.terminate_on_signals",
        "input": f"{name} to a real process inside two nested blocks, then SIGINT during its cleanup",
        "result": f"Terminated raised once, cleanup finished (the second signal counted, not raised), "
                  f"handlers restored, exit code {child.returncode}"})


def test_signal_ends_a_real_mlflow_run_as_killed_with_a_reason(tmp_path, figures):
    """The use the lead wires in: ``finally`` ends the run KILLED with the signal as reason."""
    from mlflow.tracking import MlflowClient

    from reports.schema import TAG_REASON

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = _python(f"""
        import sys, time
        from pathlib import Path
        import mlflow
        from alwa_sweep.signals import Terminated, terminate_on_signals
        mlflow.set_tracking_uri(sys.argv[1])
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("e")
        run = client.create_run(experiment)
        try:
            with terminate_on_signals():
                status, reason = "FAILED", "error"
                try:
                    Path(sys.argv[2]).write_text(run.info.run_id)
                    time.sleep(120)
                    status, reason = "FINISHED", "ok"
                except Terminated as exc:
                    status, reason = "KILLED", exc.reason
                    raise
                finally:
                    client.set_tag(run.info.run_id, {TAG_REASON!r}, reason)
                    client.set_terminated(run.info.run_id, status=status)
        except Terminated as exc:
            sys.exit(exc.exit_code)
    """, store, tmp_path / "run_id")
    try:
        _wait_for(tmp_path / "run_id", timeout=60)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, err
    run = MlflowClient(store).get_run((tmp_path / "run_id").read_text())
    assert run.info.status == "KILLED"
    assert run.data.tags[TAG_REASON] == "terminated by SIGTERM"
    figures.add_row("building_blocks", {
        "piece": "alwa_sweep.signals + MLflow",
        "input": "SIGTERM to a process with a RUNNING MLflow run (SQLite store)",
        "result": f"run {run.info.status}, {TAG_REASON} = {run.data.tags[TAG_REASON]!r}, exit code "
                  f"{child.returncode}"})


def test_outside_the_main_thread_it_installs_nothing():
    import threading

    from alwa_sweep.signals import terminate_on_signals

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker():
        with terminate_on_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before]


# ------------------------------------------------------------------------ checkpoints
def test_disk_full_while_checkpointing_removes_the_partial_file(tmp_path, monkeypatch, figures):
    from trainers import checkpoint
    from trainers.errors import CheckpointWriteError, UserInputError

    state = {"w": torch.arange(1000, dtype=torch.float32)}
    for iteration in (1, 2):
        checkpoint.save_checkpoint(state, tmp_path, iteration)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_save = torch.save

    def save_until_full(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    with pytest.raises(CheckpointWriteError) as caught:
        checkpoint.save_checkpoint(state, tmp_path, 3)
    assert isinstance(caught.value, UserInputError) and caught.value.where == str(tmp_path)
    message = str(caught.value)
    assert "ckpt_00000003.pt" in message and "No space left on device" in message
    assert "MiB free" in message and "Free some disk space" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .tmp, nothing renamed
    figures.add_row("building_blocks", {
        "piece": "trainers.checkpoint.save_checkpoint",
        "input": "OSError(ENOSPC) after torch.save wrote part of the file; EDQUOT on the digest",
        "result": "CheckpointWriteError naming the folder and its free space; 0 files left behind, "
                  "the previous checkpoints load"})
    loaded, path = checkpoint.load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt_00000002.pt" and torch.equal(loaded["w"], state["w"])

    # The digest's write failing (after the data) leaves nothing behind either.
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    real_write_text = Path.write_text

    def digest_write_fails(self, *args, **kwargs):
        if self.name.endswith(".sha256.tmp"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", digest_write_fails)
    with pytest.raises(CheckpointWriteError, match="Disk quota exceeded"):
        checkpoint.save_checkpoint(state, tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_torch_write_failure_as_runtime_error_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    from trainers import checkpoint
    from trainers.errors import CheckpointWriteError

    def failing(obj, handle, *args, **kwargs):
        handle.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", failing)
    with pytest.raises(CheckpointWriteError, match="file write failed"):
        checkpoint.save_checkpoint({"w": torch.zeros(3)}, tmp_path, 1)
    assert list(tmp_path.iterdir()) == []

    def bug(obj, handle, *args, **kwargs):  # not a write failure: stays a bug, not user error
        raise RuntimeError("cannot pickle 'generator' object")

    monkeypatch.setattr(checkpoint.torch, "save", bug)
    with pytest.raises(RuntimeError, match="cannot pickle") as caught:
        checkpoint.save_checkpoint({"w": torch.zeros(3)}, tmp_path, 1)
    assert not isinstance(caught.value, CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []


def test_resume_of_an_empty_or_all_corrupt_folder_is_refused_before_loading(tmp_path):
    from trainers.checkpoint import (find_resumable_checkpoint, require_resumable_checkpoint,
                                     save_checkpoint)
    from trainers.errors import NoResumableCheckpointError, UserInputError

    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_resumable_checkpoint(empty) is None
    with pytest.raises(NoResumableCheckpointError, match="holds no checkpoint") as caught:
        require_resumable_checkpoint(empty)
    assert isinstance(caught.value, UserInputError) and str(empty) in caught.value.where
    with pytest.raises(NoResumableCheckpointError, match="does not exist"):
        require_resumable_checkpoint(tmp_path / "nowhere")

    folder = tmp_path / "work"
    for iteration in (5, 10, 15):
        save_checkpoint({"w": torch.full((64,), float(iteration))}, folder, iteration)
    assert require_resumable_checkpoint(folder).name == "ckpt_00000015.pt"
    newest = folder / "ckpt_00000015.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    assert find_resumable_checkpoint(folder).name == "ckpt_00000010.pt"
    # A file argument: that file or an older sibling.
    assert find_resumable_checkpoint(newest).name == "ckpt_00000010.pt"
    for path in folder.glob("ckpt_*.pt"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(NoResumableCheckpointError) as caught:
        require_resumable_checkpoint(folder)
    message = str(caught.value)
    assert "all 3 checkpoints are corrupt" in message and "SHA-256 does not match" in message
    assert "without --resume" in message


def test_checkpoint_check_without_digest_uses_the_zip_container(tmp_path):
    from trainers.checkpoint import check_checkpoint_file, save_checkpoint

    path = save_checkpoint({"w": torch.randn(256)}, tmp_path, 1)
    path.with_name(path.name + ".sha256").unlink()
    assert check_checkpoint_file(path) is None
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 50])
    assert "zip" in check_checkpoint_file(path)
    path.write_bytes(b"")
    assert check_checkpoint_file(path) == "empty (0 bytes)"
    path.write_bytes(os.urandom(4096))
    assert check_checkpoint_file(path) is not None


# ------------------------------------------------------------------------ image files
@pytest.fixture
def voc_copy(synthetic_voc, tmp_path):
    import shutil

    shutil.copytree(Path(synthetic_voc["root"]), tmp_path / "VOCdevkit")
    return tmp_path / "VOCdevkit"


def test_dataset_images_are_opened_and_bad_files_named(voc_copy, figures):
    from trainers.data import VOCDetection
    from trainers.data.checks import check_dataset_images
    from trainers.errors import DatasetError

    dataset = VOCDetection(voc_copy, ["2007/test"])
    started = time.perf_counter()
    assert check_dataset_images(dataset) == len(dataset.annotations)
    per_image_ms = 1000 * (time.perf_counter() - started) / len(dataset.annotations)
    assert per_image_ms < 5
    figures.add_row("building_blocks", {
        "piece": "trainers.data.checks.check_dataset_images",
        "input": "0-byte, half-truncated, 200-byte and non-JPEG image files; a size differing from <size>",
        "result": f"each a DatasetError naming the file; headers of the intact set: {per_image_ms:.2f} ms "
                  "per image"})
    jpeg = dataset.image_paths[1]
    original = jpeg.read_bytes()
    for content, words in [(b"", "is empty (0 bytes)"),
                           (original[: len(original) // 2], "truncated JPEG"),
                           (b"GIF89a not really", "not an image file"),
                           (original[:200], None)]:
        jpeg.write_bytes(content)
        with pytest.raises(DatasetError) as caught:
            check_dataset_images(dataset)
        assert caught.value.where == str(jpeg)
        if words:
            assert words in str(caught.value)
    jpeg.write_bytes(original)
    # Pixel decoding (decode=True) agrees on the intact tree.
    assert check_dataset_images(dataset, decode=True) == len(dataset.annotations)
    # A size that differs from the annotation's <size>.
    from PIL import Image
    Image.new("RGB", (100, 90)).save(jpeg, format="JPEG")
    with pytest.raises(DatasetError, match=r"is 100x90 pixels but its annotation .* says 128x128"):
        check_dataset_images(dataset)
    assert check_dataset_images(dataset, check_size=False) == len(dataset.annotations)


def test_coco_images_checked_and_crowd_only_file_refused(synthetic_coco, tmp_path):
    import shutil

    from trainers.data import COCODetection
    from trainers.data.checks import check_dataset_images
    from trainers.errors import DatasetError

    images = tmp_path / "val"
    shutil.copytree(synthetic_coco["val_images"], images)
    data = json.loads(Path(synthetic_coco["val_ann"]).read_text())
    dataset = COCODetection(synthetic_coco["val_ann"], images)
    assert check_dataset_images(dataset) == len(data["images"])
    first = images / data["images"][0]["file_name"]
    first.write_bytes(b"")
    with pytest.raises(DatasetError, match="is empty") as caught:
        check_dataset_images(dataset)
    assert caught.value.where == str(first)

    for ann in data["annotations"]:
        ann["iscrowd"] = 1
    crowd = tmp_path / "crowd.json"
    crowd.write_text(json.dumps(data))
    COCODetection(crowd, images)  # a test set may hold crowd regions only
    with pytest.raises(DatasetError, match="holds no image usable for training") as caught:
        COCODetection(crowd, images, train=True)
    assert caught.value.where == str(crowd)
    assert f"{len(data['annotations'])} of them crowd regions" in str(caught.value)


def test_voc_boxes_outside_the_image_and_infinite_numbers_are_refused(voc_copy):
    from trainers.data.voc import VOC_CLASSES, parse_voc_xml
    from trainers.errors import DatasetError

    classes = {name: i for i, name in enumerate(VOC_CLASSES, start=1)}
    xml = sorted((voc_copy / "VOC2007" / "Annotations").glob("*.xml"))[0]
    text = xml.read_text()
    start = text.index("<xmax>")
    end = text.index("</xmax>", start)
    for value, words in [("500", "lies outside the 128x128 image"), ("inf", "non-numeric <xmax>"),
                         ("nan", "non-numeric <xmax>"), ("1e999", "non-numeric <xmax>")]:
        xml.write_text(text[:start] + f"<xmax>{value}" + text[end:])
        with pytest.raises(DatasetError) as caught:
            parse_voc_xml(xml, classes)
        assert caught.value.where == str(xml) and words in str(caught.value)
    xml.write_text(text.replace("<width>128</width>", "<width>0</width>"))
    with pytest.raises(DatasetError, match="must be positive"):
        parse_voc_xml(xml, classes)
    # An entity-expansion ("billion laughs") XML: expat's amplification limit stops it.
    entities = '<!ENTITY a0 "lol">' + "".join(f'<!ENTITY a{i} "{f"&a{i - 1};" * 10}">' for i in range(1, 10))
    xml.write_text(f'<?xml version="1.0"?><!DOCTYPE annotation [{entities}]><annotation><size>'
                   '<width>&a9;</width><height>9</height></size></annotation>')
    started = time.perf_counter()
    with pytest.raises(DatasetError, match="malformed XML"):
        parse_voc_xml(xml, classes)
    assert time.perf_counter() - started < 5


# ----------------------------------------------------------------------- CLI numbers
@pytest.mark.parametrize("argv, field", [
    (["make-synthetic", "--seed", "-1"], "--seed"),
    (["make-synthetic", "--seed", str(2**32)], "--seed"),
    (["make-synthetic", "--seed", "1.5"], "--seed"),
    (["make-synthetic", "--images", "0"], "--images"),
    (["make-synthetic", "--images", "ten"], "--images"),
    (["make-synthetic", "--images", "9" * 5000], "--images"),
    (["make-synthetic", "--size", str(10**9)], "--size"),
    (["make-synthetic", "--size", "nan"], "--size"),
    (["make-synthetic", "--num-classes", "0"], "--num-classes"),
    (["make-synthetic", "--format", "kitti"], "--format"),
    (["make-synthetic", "--images", "100000", "--size", "4096"], "--images"),
    (["make-synthetic", "--out", ""], "--out"),
    (["evaluate", "--dataset", "voc", "--detections", "d.json", "--voc-root", "r", "--iou", "nan"], "--iou"),
    (["evaluate", "--dataset", "voc", "--detections", "d.json", "--voc-root", "r", "--iou", "0"], "--iou"),
    (["evaluate", "--dataset", "voc", "--detections", "d.json", "--voc-root", "r", "--iou", "1.5"], "--iou"),
    (["evaluate", "--dataset", "voc", "--detections", "d.json", "--voc-root", "r", "--sets", "2007"], "--sets"),
    (["evaluate", "--dataset", "voc", "--detections", "d.json", "--method", "12point"], "--method"),
    (["evaluate", "--dataset", "coco", "--detections", "d.json", "--iou-type", "keypoints"], "--iou-type"),
    (["evaluate", "--dataset", "coco", "--detections", "d.json", "--ann-file", "a.json", "--iou", "0.7"], "--iou"),
    (["evaluate", "--dataset", "voc", "--detections", "d.json", "--ann-file", "a.json"], "--ann-file"),
    (["evaluate", "--dataset", "yolo", "--detections", "d.json"], "--dataset"),
    (["evaluate", "--dataset", "voc"], "--detections"),
    (["evaluate", "--dataset", "voc", "--detections", ""], "--detections"),
])
def test_bad_cli_numbers_are_one_paragraph_exit_2_before_anything_is_written(argv, field, tmp_path,
                                                                             capsys, monkeypatch, figures):
    from alwa_sweep.cli import main

    monkeypatch.chdir(tmp_path)
    if argv[0] == "make-synthetic" and "--out" not in argv:
        argv = argv + ["--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    message = err.strip()
    assert message.startswith("error:") and "\n" not in message, message
    assert field in message and "Traceback" not in out + err
    assert not (tmp_path / "out").exists()
    shown = " ".join(a if len(a) < 30 else a[:12] + "…" for a in argv if not a.startswith(str(tmp_path)))
    figures.add_row("building_blocks", {"piece": f"alwa-sweep {argv[0]}", "input": shown,
                                        "result": f"exit {code}: {message[:110]}"})
