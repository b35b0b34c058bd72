"""Classes of the red team's list, each checked through the real CLI (in process unless a
second process is the point): exit code 2, one paragraph naming the field and the value,
and nothing created (no MLflow run, no sweep folder, no store where none was asked for)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alwa_sweep.cli import main
from reliability_helpers import runs_in_store

REPO = Path(__file__).resolve().parents[2]


def _invoke(argv, capsys):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _refused(code, out, err, *names, figures=None, case=""):
    text = err.strip()
    assert code == 2, f"exit {code}; stdout {out[-500:]!r}; stderr {text[-800:]!r}"
    assert "Traceback" not in out + err
    assert text.startswith("error:") and sum(line.startswith("error:") for line in text.splitlines()) == 1, text
    assert "\n\n" not in text
    for name in names:
        assert name in text, f"{name!r} not in {text!r}"
    if figures is not None:
        figures.add_row("closed_classes", {"case": case, "exit_code": code, "message": text.splitlines()[0][:200]})
    return text


class World:
    def __init__(self, tmp: Path, voc: dict):
        self.tmp, self.voc = tmp, voc
        self.runs = tmp / "runs"
        self.store = tmp / "store" / "mlflow.db"
        self.work = tmp / "work"

    def base(self, **dataset) -> dict:
        return {"dataset": {"kind": "voc", "root": self.voc["root"], "train_sets": self.voc["train_sets"],
                            "test_sets": self.voc["test_sets"], "scale": [64, 64], "num_workers": 0, **dataset},
                "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
                "schedule": {"unit": "iter", "max_iters": 4, "steps": [3], "warmup_iters": 1},
                "train": {"batch_size": 2, "log_every": 2, "eval_every": 0}}

    def spec(self, name="s.yaml", grid=None, **fields) -> Path:
        spec = {"name": "s", "experiment": "s", "base": fields.pop("base", None) or self.base(),
                "grid": grid or {"weighting.method": ["none"]}, **fields}
        path = self.tmp / name
        path.write_text(yaml.safe_dump(spec))
        return path

    def config(self, name="c.yaml", **changes) -> Path:
        config = self.base()
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            config.setdefault(section, {})[key] = value
        path = self.tmp / name
        path.write_text(yaml.safe_dump(config))
        return path

    def train(self, config, *extra):
        return ["train", config, "--tracking-uri", f"sqlite:///{self.store}", "--workdir", self.work, *extra]

    def run(self, spec, *extra):
        return ["run", spec, "--runs-dir", self.runs, "--quiet", *extra]

    def nothing_created(self):
        import ray

        for db in (self.store, self.runs / "mlflow.db", self.tmp / "alwa_runs" / "mlflow.db"):
            assert runs_in_store(db) == 0, db
        assert not (self.runs / "sweeps").exists() or not any(
            (p / "tune").exists() for p in (self.runs / "sweeps").iterdir())
        assert not ray.is_initialized()


@pytest.fixture
def world(tmp_path, synthetic_voc, monkeypatch):
    for variable in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    yield World(tmp_path, synthetic_voc)
    import ray

    if ray.is_initialized():  # a failed case must not cascade into the next ones
        ray.shutdown()


def _voc_copy(world: World) -> Path:
    import shutil

    root = world.tmp / "VOCdevkit"
    shutil.copytree(world.voc["root"], root)
    return root


# ---- --resume, before the run exists -----------------------------------------------------------

@pytest.mark.parametrize("content", ["empty", "all_corrupt"])
def test_resume_of_an_empty_or_all_corrupt_folder_fails_before_any_run(content, world, capsys, figures):
    folder = world.tmp / "ckpts"
    folder.mkdir()
    if content == "all_corrupt":
        for iteration in (2, 4):
            (folder / f"ckpt_{iteration:08d}.pt").write_bytes(b"\x00garbage" * 100)
    code, out, err = _invoke(world.train(world.config(), "--resume", folder), capsys)
    _refused(code, out, err, "--resume", str(folder), figures=figures, case=f"train --resume: {content} folder")
    world.nothing_created()
    assert not world.store.exists() or runs_in_store(world.store) == 0


# ---- two writers of one work folder ------------------------------------------------------------

@pytest.mark.slow
def test_two_train_processes_on_one_workdir_the_second_fails_at_once(world, tmp_path, figures):
    from test_signal_matrix import CHILD, _env

    config = world.config()
    marker = tmp_path / "building"
    argv = ["train", str(config), "--tracking-uri", f"sqlite:///{world.store}", "--workdir", str(world.work)]
    first = subprocess.Popen([sys.executable, "-c", CHILD, "trainers.engine", "build_detector", "1", str(marker),
                              *argv], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.05)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "alwa_sweep", *argv], env=_env(), cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    text = second.stderr.strip()
    assert second.returncode == 2, text[-2000:]
    assert "Traceback" not in text and text.startswith("error:")
    assert str(first.pid) in text and "work folder" in text, text
    assert runs_in_store(world.store) == 1  # the first one's run only
    assert first.returncode == 128 + signal.SIGTERM
    figures.add_row("closed_classes", {"case": "two train processes on one --workdir", "exit_code": 2,
                                       "message": text.splitlines()[0][:200]})
    figures.record("two_writers", seconds=round(seconds, 1))


# ---- run --name S with another spec ------------------------------------------------------------

def _fake_sweep(world: World, spec_path: Path, name="S", tracking_uri=None) -> Path:
    """A sweep folder as ``run`` leaves it (spec.yaml, sweep.json), without running one."""
    sweep = world.runs / "sweeps" / name
    sweep.mkdir(parents=True)
    (sweep / "spec.yaml").write_text(spec_path.read_text())
    (sweep / "sweep.json").write_text(json.dumps({
        "name": name, "experiment": "s", "experiment_id": "1", "parent_run_id": "0" * 32,
        "tracking_uri": tracking_uri or f"sqlite:///{world.runs / 'mlflow.db'}"}))
    return sweep


@pytest.mark.parametrize("how", ["edited spec", "--set"])
def test_run_with_an_existing_name_and_another_spec_is_refused_with_the_diff(how, world, capsys, figures):
    spec = world.spec()
    _fake_sweep(world, spec)
    if how == "edited spec":
        argv = world.run(world.spec(name="s2.yaml", grid={"weighting.method": ["none", "alwa"]}), "--name", "S")
    else:
        argv = world.run(spec, "--name", "S", "--set", "optimizer.lr=0.5")
    code, out, err = _invoke(argv, capsys)
    text = _refused(code, out, err, "--name", "--force-new-name", figures=figures,
                    case=f"run --name S with an {how}")
    assert "alwa" in text if how == "edited spec" else "0.5" in text  # the diff shows the change
    assert sorted(p.name for p in (world.runs / "sweeps").iterdir()) == ["S"]
    assert not (world.runs / "sweeps" / "S" / "tune").exists()


# ---- resume: damaged or moved sweep folders ----------------------------------------------------

def test_resume_of_a_truncated_sweep_json_is_a_config_error(world, capsys, figures):
    sweep = _fake_sweep(world, world.spec())
    text = (sweep / "sweep.json").read_text()
    (sweep / "sweep.json").write_text(text[: len(text) // 2])
    code, out, err = _invoke(["resume", sweep, "--runs-dir", world.runs], capsys)
    _refused(code, out, err, "sweep.json", figures=figures, case="resume: sweep.json truncated")
    world.nothing_created()


def test_resume_of_a_moved_sweep_names_the_old_store_and_creates_nothing(world, capsys, figures):
    old_store = world.tmp / "old_place" / "runs" / "mlflow.db"
    sweep = _fake_sweep(world, world.spec(), tracking_uri=f"sqlite:///{old_store}")
    code, out, err = _invoke(["resume", sweep, "--runs-dir", world.runs], capsys)
    _refused(code, out, err, "tracking_uri", str(old_store), figures=figures,
             case="resume of a moved sweep (store not at its recorded path)")
    assert not old_store.exists() and not old_store.parent.exists()
    world.nothing_created()


# ---- where the store goes ----------------------------------------------------------------------

@pytest.mark.parametrize("runs_dir", ["runs?x=1", "runs?mode=ro"])
def test_runs_dir_with_a_question_mark_is_refused(runs_dir, world, capsys, figures):
    code, out, err = _invoke(["run", world.spec(), "--runs-dir", world.tmp / runs_dir, "--quiet"], capsys)
    _refused(code, out, err, "--runs-dir", "?", figures=figures, case=f"run --runs-dir '{runs_dir}'")
    assert sorted(p.name for p in world.tmp.iterdir() if p.suffix != ".yaml") == []  # no store anywhere
    world.nothing_created()


def test_sqlite_uri_of_a_path_with_a_question_mark_opens_that_file(tmp_path):
    from alwa_sweep.tracking import open_store, sqlite_uri

    db = tmp_path / "a?x=1" / "mlflow.db"
    db.parent.mkdir()
    open_store(sqlite_uri(db))
    assert db.exists()
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("uri", ["store/mlflow.db", "/abs/store", "mlruns"])
def test_tracking_uri_given_as_a_plain_path_is_refused_with_the_sqlite_form(uri, world, capsys, figures):
    for argv in (["train", world.config(), "--tracking-uri", uri, "--workdir", world.work],
                 ["run", world.spec(), "--tracking-uri", uri, "--runs-dir", world.runs, "--quiet"]):
        code, out, err = _invoke(argv, capsys)
        _refused(code, out, err, "--tracking-uri", uri, "sqlite:///", figures=figures,
                 case=f"{argv[0]} --tracking-uri {uri} (a plain path)")
    world.nothing_created()
    assert not world.work.exists() and not (world.tmp / "mlruns").exists()


@pytest.mark.parametrize("address", ["localhost:abc", "localhost:99999", "ray://:10001", "host:-1"])
def test_malformed_address_is_one_paragraph(address, world, capsys, figures):
    code, out, err = _invoke(world.run(world.spec(), "--address", address), capsys)
    _refused(code, out, err, "--address", figures=figures, case=f"run --address {address}")
    world.nothing_created()


def test_the_address_parser_itself_turns_a_malformed_port_into_a_config_error():
    from alwa_sweep.preflight import parse_address
    from trainers.errors import ConfigError

    for address in ("localhost:abc", "localhost:99999", "host:-1"):
        with pytest.raises(ConfigError, match="--address"):
            parse_address(address)


def test_run_name_of_a_moved_sweep_is_refused_too(world, capsys, figures):
    spec = world.spec()
    old_store = world.tmp / "elsewhere" / "mlflow.db"
    _fake_sweep(world, spec, tracking_uri=f"sqlite:///{old_store}")
    code, out, err = _invoke(world.run(spec, "--name", "S"), capsys)
    _refused(code, out, err, "tracking_uri", str(old_store), figures=figures,
             case="run --name S of a moved sweep (store not at its recorded path)")
    assert not old_store.parent.exists()
    world.nothing_created()


def test_make_synthetic_negative_seed(world, capsys, figures):
    code, out, err = _invoke(["make-synthetic", "--out", world.tmp / "d", "--seed", "-1"], capsys)
    _refused(code, out, err, "--seed", "-1", figures=figures, case="make-synthetic --seed -1")
    assert not (world.tmp / "d").exists()


# ---- datasets: values checked before anything starts -------------------------------------------

def test_coco_width_as_a_string_fails_validate_and_train(world, synthetic_coco, capsys, figures):
    import shutil

    source = Path(synthetic_coco["train_ann"]).parents[1]
    root = world.tmp / "coco"
    shutil.copytree(source, root)
    dataset = {"kind": "coco", "scale": [64, 64], "num_workers": 0}
    for key in ("train_ann", "train_images", "val_ann", "val_images"):
        dataset[key] = str(root / Path(synthetic_coco[key]).relative_to(source))
    ann = Path(dataset["train_ann"])
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = str(data["images"][0]["width"])
    ann.write_text(json.dumps(data))
    base = world.base()
    base["dataset"] = dataset
    code, out, err = _invoke(["validate", world.spec(base=base), "--check-paths"], capsys)
    _refused(code, out, err, "width", str(ann), figures=figures, case='COCO width: "96" (validate --check-paths)')
    config = world.tmp / "coco.yaml"
    config.write_text(yaml.safe_dump(base))
    code, out, err = _invoke(world.train(config), capsys)
    _refused(code, out, err, "width")
    world.nothing_created()


def test_zero_byte_jpeg_fails_validate_and_train_before_any_run(world, capsys, figures):
    root = _voc_copy(world)
    year = root / "VOC2007"
    first = (year / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    (year / "JPEGImages" / f"{first}.jpg").write_bytes(b"")
    base = world.base(root=str(root))
    code, out, err = _invoke(["validate", world.spec(base=base), "--check-paths"], capsys)
    _refused(code, out, err, f"{first}.jpg", figures=figures, case="0-byte JPEG (validate --check-paths)")
    config = world.tmp / "c0.yaml"
    config.write_text(yaml.safe_dump(base))
    code, out, err = _invoke(world.train(config), capsys)
    _refused(code, out, err, f"{first}.jpg", figures=figures, case="0-byte JPEG (train)")
    world.nothing_created()
    assert not world.work.exists()


def test_million_trial_grid_is_refused_quickly(world, capsys, figures):
    grid = {"optimizer.lr": [round(0.001 * (i + 1), 6) for i in range(1000)], "train.seed": list(range(1000))}
    started = time.perf_counter()
    code, out, err = _invoke(["validate", world.spec(grid=grid)], capsys)
    _refused(code, out, err, "grid", "1,000,000", "max_trials", figures=figures, case="a 10⁶-trial grid")
    assert time.perf_counter() - started < 10
    # max_trials itself is bounded: every trial's config is parsed when the spec is read.
    started = time.perf_counter()
    code, out, err = _invoke(["validate", world.spec(grid=grid, max_trials=1_000_000)], capsys)
    _refused(code, out, err, "max_trials", "1000000", figures=figures, case="max_trials: 1000000")
    assert time.perf_counter() - started < 10
    # At the bound (10⁴ trials) the spec is read in seconds.
    from alwa_sweep.spec import MAX_TRIALS

    started = time.perf_counter()
    code, out, err = _invoke(["validate", world.spec(grid={"optimizer.lr": grid["optimizer.lr"][:100],
                                                           "train.seed": list(range(MAX_TRIALS // 100))},
                                                     max_trials=MAX_TRIALS)], capsys)
    seconds = time.perf_counter() - started
    assert code == 0, err[-500:]
    assert seconds < 30
    figures.record("million_grid", max_trials_bound=MAX_TRIALS, seconds_at_bound=round(seconds, 1))


def test_interval_beyond_its_bound(world, capsys, figures):
    code, out, err = _invoke(["validate", world.spec(grid={"weighting.method": ["alwa"]}),
                              "--set", "weighting.interval=100000000"], capsys)
    _refused(code, out, err, "weighting.interval", "100000000", figures=figures, case="interval: 100000000")
    code, out, err = _invoke(world.train(world.config(weighting__method="alwa", weighting__interval=100_000_000)),
                             capsys)
    _refused(code, out, err, "weighting.interval")
    world.nothing_created()


def test_num_classes_that_differs_from_the_dataset(world, capsys, figures):
    from trainers.data.voc import VOC_CLASSES

    classes = len(VOC_CLASSES)  # a VOC dataset has VOC's 20 classes, whichever its images show
    wrong = 2
    code, out, err = _invoke(["validate", world.spec(), "--check-paths", "--set", f"model.num_classes={wrong}"],
                             capsys)
    _refused(code, out, err, "model.num_classes", str(wrong), figures=figures,
             case=f"model.num_classes: {wrong} on a {classes}-class (VOC) dataset (validate --check-paths)")
    code, out, err = _invoke(world.run(world.spec(), "--set", f"model.num_classes={wrong}"), capsys)
    _refused(code, out, err, "model.num_classes")
    code, out, err = _invoke(world.train(world.config(model__num_classes=wrong)), capsys)
    _refused(code, out, err, "model.num_classes", figures=figures, case="model.num_classes mismatch (train)")
    world.nothing_created()


def test_no_check_paths_still_checks_every_dataset_value(world, capsys, figures):
    for argv in (world.run(world.spec(), "--no-check-paths", "--set", "dataset.kind=pascal"),
                 ["validate", world.spec(), "--set", "dataset.kind=pascal"],
                 world.run(world.spec(), "--no-check-paths", "--set", "dataset.scale=[0, 64]"),
                 world.run(world.spec(), "--no-check-paths", "--set", "dataset.num_workers=-1")):
        code, out, err = _invoke(argv, capsys)
        flags = " ".join(str(a) for a in argv if str(a).startswith("--no") or str(a).startswith("dataset."))
        _refused(code, out, err, "dataset.", figures=figures, case=f"{argv[0]} {flags}")
    world.nothing_created()
