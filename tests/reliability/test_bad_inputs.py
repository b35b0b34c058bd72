"""Bad input fails before launch: a table of broken inputs, each given to the real CLI.

For every row: exit code ≠ 0, one paragraph naming the field or file, no traceback
(unless ``--debug``), no MLflow run, no sweep folder, and Ray never initialised in
this process. Unreachable servers must fail fast, not after MLflow's retries.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from alwa_sweep.cli import main
from reliability_helpers import closed_port, runs_in_store
from trainers.errors import ConfigError

FAST_FAIL_S = 15.0  # an unreachable server or address: one short connection attempt


class Env:
    """A fresh temporary world for one case: runs folder, store, data copies."""

    def __init__(self, tmp: Path, voc: dict, coco: dict):
        self.tmp, self.voc, self.coco = tmp, voc, coco
        self.runs = tmp / "runs"
        self.store = tmp / "store" / "mlflow.db"
        self.uri = f"sqlite:///{self.store}"

    # ---- specs and configs
    def base_config(self, dataset: dict | None = None) -> dict:
        return {
            "dataset": dataset or {"kind": "voc", "root": self.voc["root"], "train_sets": self.voc["train_sets"],
                                   "test_sets": self.voc["test_sets"], "scale": [64, 64], "num_workers": 0},
            "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
            "schedule": {"unit": "iter", "max_iters": 4, "steps": [3], "warmup_iters": 1},
            "train": {"batch_size": 2, "log_every": 2, "eval_every": 0},
        }

    def spec(self, drop: str | None = None, dataset: dict | None = None, **fields) -> str:
        spec = {"name": "bad", "experiment": "bad-inputs", "base": self.base_config(dataset),
                "grid": {"weighting.method": ["none"]}}
        spec.update(fields)
        spec.pop(drop, None)
        return self.write("spec.yaml", yaml.safe_dump(spec))

    def config(self, dataset: dict | None = None, **fields) -> str:
        return self.write("config.yaml", yaml.safe_dump({**self.base_config(dataset), **fields}))

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def afile(self) -> Path:
        path = self.tmp / "afile"
        path.write_text("a regular file, not a folder\n")
        return path

    # ---- broken copies of the synthetic datasets
    def voc_copy(self) -> tuple[Path, dict]:
        root = self.tmp / "VOCdevkit"
        shutil.copytree(self.voc["root"], root)
        dataset = self.base_config()["dataset"]
        dataset["root"] = str(root)
        return root / "VOC2007", dataset

    def first_id(self, year_dir: Path, split: str) -> str:
        return (year_dir / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]

    def coco_copy(self) -> tuple[Path, dict]:
        root = self.tmp / "coco"
        source = Path(self.coco["train_ann"]).parents[1]
        shutil.copytree(source, root)
        dataset = {"kind": "coco", "scale": [64, 64], "num_workers": 0}
        for key in ("train_ann", "train_images", "val_ann", "val_images"):
            dataset[key] = str(root / Path(self.coco[key]).relative_to(source))
        return root, dataset

    # ---- command lines
    def run(self, spec: str, *extra: str) -> list[str]:
        return ["run", spec, "--runs-dir", str(self.runs), "--quiet", *extra]

    def train(self, config: str, *extra: str) -> list[str]:
        return ["train", config, "--tracking-uri", self.uri, "--workdir", str(self.tmp / "work"), *extra]


def _split_removed(e: Env):
    year, dataset = e.voc_copy()
    (year / "ImageSets" / "Main" / "test.txt").unlink()
    return e.run(e.spec(dataset=dataset))


def _xml_corrupted(e: Env, command: str):
    year, dataset = e.voc_copy()
    xml = year / "Annotations" / f"{e.first_id(year, 'trainval')}.xml"
    xml.write_text(xml.read_text()[: len(xml.read_text()) // 2])
    return e.run(e.spec(dataset=dataset)) if command == "run" else e.train(e.config(dataset=dataset))


def _image_removed(e: Env):
    year, dataset = e.voc_copy()
    (year / "JPEGImages" / f"{e.first_id(year, 'test')}.jpg").unlink()
    return e.run(e.spec(dataset=dataset))


def _coco_json_truncated(e: Env):
    _, dataset = e.coco_copy()
    ann = Path(dataset["train_ann"])
    ann.write_text(ann.read_text()[:500])
    return e.run(e.spec(dataset=dataset))


def _coco_image_removed(e: Env):
    _, dataset = e.coco_copy()
    first = json.loads(Path(dataset["val_ann"]).read_text())["images"][0]["file_name"]
    (Path(dataset["val_images"]) / first).unlink()
    return e.run(e.spec(dataset=dataset))


def _resume_unreachable_store(e: Env):
    sweep = e.runs / "sweeps" / "old"
    sweep.mkdir(parents=True)
    (sweep / "spec.yaml").write_text(Path(e.spec()).read_text())
    (sweep / "sweep.json").write_text(json.dumps({
        "name": "old", "spec_name": "bad", "experiment": "bad-inputs", "experiment_id": "1",
        "parent_run_id": "0" * 32, "tracking_uri": f"http://127.0.0.1:{closed_port()}"}))
    return ["resume", "old", "--runs-dir", str(e.runs), "--quiet"]


@dataclass
class Case:
    name: str
    build: Callable[[Env], list[str]]
    named: tuple[str, ...]  # what the message must name
    creates_sweep_dir: bool = False  # the case itself sets a sweep folder up (resume)


def grid(**axes):
    return lambda e: e.run(e.spec(grid=axes))


CASES = [
    # -- the spec file, through `run` (the command that would launch)
    Case("spec: YAML syntax error", lambda e: e.run(e.write("s.yaml", "base: {model: [faster_rcnn\ngrid: {}\n")),
         ("s.yaml", "not valid YAML")),
    Case("spec: a list, not a mapping", lambda e: e.run(e.write("s.yaml", "- base\n- grid\n")),
         ("s.yaml", "mapping")),
    Case("spec: file does not exist", lambda e: e.run(str(e.tmp / "nope.yaml")), ("nope.yaml", "not found")),
    Case("spec: unknown top-level key `trials`", lambda e: e.run(e.spec(trials=3)), ("trials", "unknown key")),
    Case("spec: `grid` missing", lambda e: e.run(e.spec(drop="grid")), ("grid", "missing")),
    Case("spec: empty grid", lambda e: e.run(e.spec(grid={})), ("grid", "empty")),
    Case("spec: grid axis with no values", grid(**{"weighting.method": []}), ("grid.weighting.method",)),
    Case("spec: grid axis not a list", grid(**{"weighting.method": "alwa"}), ("grid.weighting.method",)),
    Case("unknown detector `yolo`", grid(**{"model.detector": ["yolo"]}), ("model.detector", "yolo")),
    Case("unknown loss `l7`", grid(**{"model.losses.roi_reg.type": ["l7"]}), ("model.losses.roi_reg.type",)),
    Case("unknown weighting `magic`", grid(**{"weighting.method": ["alwa", "magic"]}), ("weighting.method",)),
    Case("unknown optimizer `rmsprop`", grid(**{"optimizer.type": ["rmsprop"]}), ("optimizer.type",)),
    Case("unknown dataset kind `pascal`", grid(**{"dataset.kind": ["pascal"]}), ("dataset.kind",)),
    Case("wrong type: batch size `two`", grid(**{"train.batch_size": ["two"]}), ("train.batch_size",)),
    Case("wrong type: seeds `[-1]`", lambda e: e.run(e.spec(seeds=[-1])), ("seeds",)),
    Case("negative weight: fixed cls = -1", grid(weighting=[{"method": "fixed", "cls": -1.0}]), ("weighting.cls",)),
    Case("zero weight: fixed reg = 0", grid(weighting=[{"method": "fixed", "reg": 0}]), ("weighting.reg",)),
    Case("zero weight: ALWA λ0 = 0", grid(weighting=[{"method": "alwa", "lambda0": 0}]), ("weighting.lambda0",)),
    Case("ALWA interval = 0", grid(weighting=[{"method": "alwa", "interval": 0}]), ("weighting.interval",)),
    Case("ALWA interval = -5", grid(weighting=[{"method": "alwa", "interval": -5}]), ("weighting.interval",)),
    Case("ALWA variant = 3", grid(weighting=[{"method": "alwa", "variant": 3}]), ("weighting.variant",)),
    Case("negative learning rate", grid(**{"optimizer.lr": [-0.1]}), ("optimizer.lr",)),
    Case("lr step after the end of training", grid(**{"schedule.steps": [[99]]}), ("schedule.steps",)),
    Case("resources: negative CPUs", lambda e: e.run(e.spec(resources={"cpus_per_worker": -1})),
         ("resources.cpus_per_worker",)),
    Case("unknown scheduler `hyperband`", lambda e: e.run(e.spec(scheduler={"type": "hyperband"})),
         ("scheduler.type",)),
    # -- the dataset the spec points at
    Case("dataset root missing", grid(**{"dataset.root": ["/nonexistent/VOCdevkit"]}), ("dataset.root",)),
    Case("split file missing", _split_removed, ("test_sets", "test.txt")),
    Case("annotation XML truncated", lambda e: _xml_corrupted(e, "run"), (".xml", "malformed XML")),
    Case("JPEG image missing", _image_removed, (".jpg", "missing")),
    Case("COCO JSON truncated", _coco_json_truncated, ("instances_train.json", "not valid JSON")),
    Case("COCO image missing", _coco_image_removed, ("instances_val.json", "missing")),
    # -- where it would run and write
    Case("unreachable --address", lambda e: e.run(e.spec(), "--address", f"127.0.0.1:{closed_port()}"),
         ("--address", "cannot reach")),
    Case("unreachable --address ray://", lambda e: e.run(e.spec(), "--address", f"ray://127.0.0.1:{closed_port()}"),
         ("--address",)),
    Case("unwritable --runs-dir (under a file)", lambda e: e.run(e.spec(), "--runs-dir", str(e.afile() / "sub")),
         ("--runs-dir", "cannot write")),
    Case("unreachable tracking server", lambda e: e.run(e.spec(), "--tracking-uri",
                                                        f"http://127.0.0.1:{closed_port()}"),
         ("--tracking-uri", "cannot reach")),
    Case("tracking store under a file", lambda e: e.run(e.spec(), "--tracking-uri",
                                                        f"sqlite:///{e.afile()}/sub/mlflow.db"),
         ("--tracking-uri",)),
    Case("--name with spaces", lambda e: e.run(e.spec(), "--name", "my sweep"), ("--name",)),
    Case("--max-concurrent 0", lambda e: e.run(e.spec(), "--max-concurrent", "0"), ("--max-concurrent",)),
    Case("--set without '='", lambda e: e.run(e.spec(), "--set", "optimizer.lr"), ("--set",)),
    # -- train
    Case("train: config file missing", lambda e: e.train(str(e.tmp / "none.yaml")), ("none.yaml",)),
    Case("train: unknown section `trainer`", lambda e: e.train(e.config(trainer={"epochs": 1})),
         ("trainer", "unknown key")),
    Case("train: --set train.batch_size=0", lambda e: e.train(e.config(), "--set", "train.batch_size=0"),
         ("train.batch_size",)),
    Case("train: annotation XML truncated", lambda e: _xml_corrupted(e, "train"), (".xml", "malformed XML")),
    Case("train: unreachable tracking server",
         lambda e: ["train", e.config(), "--tracking-uri", f"http://127.0.0.1:{closed_port()}",
                    "--workdir", str(e.tmp / "work")], ("--tracking-uri", "cannot reach")),
    Case("train: --workdir under a file", lambda e: ["train", e.config(), "--tracking-uri", e.uri,
                                                     "--workdir", str(e.afile() / "work")], ("--workdir",)),
    Case("train: --resume missing", lambda e: e.train(e.config(), "--resume", str(e.tmp / "ckpt.pt")),
         ("--resume",)),
    Case("train: --run-name with '/'", lambda e: e.train(e.config(), "--run-name", "../escape"),
         ("--run-name",)),
    # -- validate, evaluate, report, ui, resume, make-synthetic
    Case("validate: unknown resources key", lambda e: ["validate", e.spec(resources={"gpus": 1})],
         ("resources.gpus",)),
    Case("validate --check-paths: annotation XML truncated",
         lambda e: ["validate", _xml_corrupted(e, "run")[1], "--check-paths"], (".xml", "malformed XML")),
    Case("demo: --out under a file", lambda e: ["demo", "--out", str(e.afile() / "demo"), "--quick"], ("--out",)),
    Case("demo: --workers 0", lambda e: ["demo", "--out", str(e.tmp / "demo"), "--workers", "0"], ("--workers",)),
    Case("evaluate: detections not JSON",
         lambda e: ["evaluate", "--dataset", "voc", "--voc-root", e.voc["root"], "--sets", "2007/test",
                    "--detections", e.write("det.json", "[{\"image_id\": ")], ("det.json", "not valid JSON")),
    Case("evaluate: COCO ground truth not JSON",
         lambda e: ["evaluate", "--dataset", "coco", "--ann-file", e.write("gt.json", "{"),
                    "--detections", e.write("det.json", "[]")], ("gt.json", "not valid JSON")),
    Case("report: no store at --tracking-uri",
         lambda e: ["report", "--experiment", "x", "--tracking-uri", e.uri, "--out", str(e.tmp / "r")],
         ("--tracking-uri", "no MLflow database")),
    Case("report: unreachable tracking server",
         lambda e: ["report", "--experiment", "x", "--tracking-uri", f"http://127.0.0.1:{closed_port()}"],
         ("--tracking-uri", "cannot reach")),
    Case("ui: --host 0.0.0.0 without --allow-remote", lambda e: ["ui", "--host", "0.0.0.0", "--store", e.uri],
         ("--host", "--allow-remote")),
    Case("ui: --port 70000", lambda e: ["ui", "--port", "70000", "--store", e.uri], ("--port",)),
    Case("ui: --store file missing", lambda e: ["ui", "--store", str(e.tmp / "none.db")], ("--store",)),
    Case("ui: --basic-auth without its secrets", lambda e: ["ui", "--basic-auth", "--store", e.uri],
         ("--basic-auth", "MLFLOW_AUTH_ADMIN_PASSWORD")),
    Case("resume: no such sweep", lambda e: ["resume", "nosuch", "--runs-dir", str(e.runs)], ("SWEEP", "nosuch")),
    Case("resume: its tracking server unreachable", _resume_unreachable_store, ("tracking_uri", "cannot reach"),
         creates_sweep_dir=True),
    Case("make-synthetic: --out under a file",
         lambda e: ["make-synthetic", "--out", str(e.afile() / "data"), "--images", "8"], ("--out",)),
    Case("make-synthetic: --images 2", lambda e: ["make-synthetic", "--out", str(e.tmp / "d"), "--images", "2"],
         ("--images",)),
]


def _invoke(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.fixture
def env(tmp_path, synthetic_voc, synthetic_coco, monkeypatch):
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
                     "RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository either
    return Env(tmp_path, synthetic_voc, synthetic_coco)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_before_launch(case, env, capsys, figures):
    import ray

    assert not ray.is_initialized()
    argv = case.build(env)
    started = time.perf_counter()
    code = _invoke(argv)
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    message = err.strip().replace(str(env.tmp), "<tmp>")
    stores = [env.store, env.runs / "mlflow.db", env.tmp / "mlflow.db", env.tmp / "alwa_runs" / "mlflow.db"]
    runs_created = sum(runs_in_store(db) for db in stores)
    sweep_folder = (env.runs / "sweeps").exists() and not case.creates_sweep_dir
    figures.add_row("bad_inputs", {
        "case": case.name, "command": argv[0], "exit_code": code, "seconds": round(seconds, 2),
        "message": message.splitlines()[-1] if message else "", "traceback": "Traceback" in out + err,
        "mlflow_runs": runs_created, "sweep_folder": sweep_folder, "ray_initialized": ray.is_initialized()})

    assert code not in (0, None), f"exit code {code}; stdout: {out[-500:]}"
    assert "Traceback" not in out + err
    assert message and "\n\n" not in message, f"not one paragraph: {message!r}"
    for name in case.named:
        assert name in message, f"{name!r} not named in: {message!r}"
    assert runs_created == 0
    assert not sweep_folder
    if case.creates_sweep_dir:
        assert not (env.runs / "sweeps" / "old" / "tune").exists()
    assert not ray.is_initialized()
    if "unreachable" in case.name:
        assert seconds < FAST_FAIL_S


def test_debug_shows_the_traceback(env, capsys):
    spec = env.spec(grid={"model.detector": ["yolo"]})
    assert _invoke(["validate", spec]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.detector"):
        main(["--debug", "validate", spec])
    with pytest.raises(ConfigError, match="model.detector"):
        main(["validate", spec, "--debug"])
