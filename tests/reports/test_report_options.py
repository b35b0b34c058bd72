"""Every `alwa-sweep report` option on a store written by the real MLflow logger.

Trials are recorded the way a sweep records them: ``MlflowHook`` (params from
the resolved config, evaluations, final status) under a sweep run, plus each trial's
``detections.npz`` artifact (``detections_io.save_detections``). Their logged val/map
is ``voc_map`` of those detections, so the tables, the paper columns and ``--ci`` can
be checked against numbers read back from MLflow and recomputed here.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from alwa_sweep.cli import main
from alwa_sweep.tracking import MlflowHook
from reports import schema as S
from trainers.config import parse_config
from trainers.evaluation.voc import voc_map

N_IMAGES = 150
EXPERIMENT = "options-demo"


def ground_truth(rng):
    annotations = []
    for _ in range(N_IMAGES):
        m = int(rng.integers(1, 4))
        xy = rng.uniform(0, 100, (m, 2))
        annotations.append({"boxes": np.hstack([xy, xy + rng.uniform(10, 50, (m, 2))]).astype(np.float32),
                            "labels": rng.integers(1, 6, m), "difficult": rng.random(m) < 0.1})
    return annotations


def detector_output(annotations, rng, found: float):
    """Each ground truth found with probability ``found`` (jittered), plus clutter."""
    out = []
    for gt in annotations:
        keep = rng.random(len(gt["labels"])) < found
        boxes = gt["boxes"][keep] + rng.normal(0, 2, (keep.sum(), 4))
        clutter = rng.uniform(0, 100, (3, 2))
        boxes = np.vstack([boxes, np.hstack([clutter, clutter + 20])])
        labels = np.concatenate([gt["labels"][keep], rng.integers(1, 6, 3)])
        scores = np.concatenate([rng.uniform(0.5, 1, keep.sum()), rng.uniform(0, 0.6, 3)])
        out.append({"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32), "labels": labels})
    return out


def log_trial(client, experiment_id, parent, name, user_config, annotations, detections, folder):
    config = parse_config(user_config)
    logger = MlflowHook.create(
        client, experiment_id, name, parent_run_id=parent,
        tags={S.TAG_KIND: S.KIND_TRIAL, S.TAG_TRIAL_KEY: name})
    logger.start(config, 0, 10)
    result = voc_map(detections, annotations)
    for epoch, value in ((1, result["map"] - 0.05), (2, result["map"])):
        logger.log_evaluation(epoch, epoch * 5, {S.METRIC_MAP: value})
    logger.log_detections(detections, annotations, list(range(len(annotations))), None)
    logger.finish(S.STATUS_OK, "", {S.METRIC_MAP: result["map"]})
    return logger.run_id, result["map"]


def user_config(method: dict, seed: int, iters: int) -> dict:
    return {"dataset": {"kind": "voc", "root": "/data/synthetic"},
            "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
            "schedule": {"unit": "iter", "max_iters": iters, "steps": [iters - 2]},
            "train": {"seed": seed}, "weighting": method}


BASELINE = {"method": "none"}
ALWA2 = {"method": "alwa", "variant": 2, "lambda0": 1.0, "interval": 5}


@pytest.fixture(scope="module")
def store():
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="alwa-options-", dir=shm))
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    annotations = ground_truth(rng)
    sweeps, finals = {}, {}
    for sweep_name, iters, found in (("quick", 40, (0.5, 0.8)), ("full", 360, (0.6, 0.62))):
        sweep = client.create_run(experiment_id, run_name=sweep_name,
                                  tags={S.TAG_KIND: S.KIND_SWEEP, S.TAG_SWEEP: sweep_name}).info.run_id
        for seed in (0, 1):
            for label, method, quality in (("base", BASELINE, found[0]), ("alwa2", ALWA2, found[1])):
                name = f"{sweep_name}_{label}_s{seed}"
                detections = detector_output(annotations, np.random.default_rng(zlib.crc32(name.encode())), quality)
                run_id, value = log_trial(client, experiment_id, sweep, name, user_config(method, seed, iters),
                                          annotations, detections, root / "files")
                finals[name] = (run_id, value)
        client.set_terminated(sweep)
        sweeps[sweep_name] = sweep
    yield {"uri": uri, "client": client, "sweeps": sweeps, "finals": finals, "root": root}
    shutil.rmtree(root, ignore_errors=True)


def logged_percent(client, run_id) -> float:
    """The run's val/map as MLflow stores it, in percent."""
    return client.get_run(run_id).data.metrics[S.METRIC_MAP] * 100.0


def report(store, tmp_path, *options, sweep="quick"):
    out = tmp_path / "out"
    code = main(["report", "--sweep", store["sweeps"][sweep], "--tracking-uri", store["uri"],
                 "--out", str(out), *options])
    return code, out


def table_row(markdown: str, label: str) -> list[str]:
    for line in (line for line in markdown.splitlines() if line.startswith("|")):
        cells = [c.strip().removeprefix("**").removesuffix("**") for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


def seeds_text(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def test_compact_table6_and_values_equal_mlflow(store, tmp_path, capsys):
    code, out = report(store, tmp_path, "--compact", "--no-figures")
    assert code == 0, capsys.readouterr().err
    client, finals = store["client"], store["finals"]
    base = [logged_percent(client, finals[f"quick_base_s{s}"][0]) for s in (0, 1)]
    alwa = [logged_percent(client, finals[f"quick_alwa2_s{s}"][0]) for s in (0, 1)]
    table2 = (out / "table2.md").read_text()
    rows = [line for line in table2.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["Faster R-CNN", "+ALWA_2"]  # compact
    assert table_row(table2, "Faster R-CNN")[2] == seeds_text(base)
    assert table_row(table2, "+ALWA_2")[2] == seeds_text(alwa)
    table6 = (out / "table6.md").read_text()  # the ALWA_2 table --compact used to fail on
    # C = 5 at λ0 = 1: the C block only; its row has no λ0 of the other block beside it
    assert table_row(table6, "")[1:] == ["5", seeds_text(alwa)]
    assert "reading runs" in capsys.readouterr().err  # the progress bar, on stderr


def test_paper_columns_say_the_demo_is_not_comparable(store, tmp_path, capsys):
    code, out = report(store, tmp_path, "--paper", "--compact", "--no-figures", "--table", "2",
                       "--table", "6")
    assert code == 0
    table2 = (out / "table2.md").read_text()
    assert "nan" not in "".join(line for line in table2.splitlines() if line.startswith("|"))
    assert "model.backbone = tiny" in table2 and "schedule = 40 iterations" in table2
    assert "not comparable" in table2.lower()
    table6 = (out / "table6.md").read_text()
    assert "nan" not in "".join(line for line in table6.splitlines() if line.startswith("|"))


def test_experiment_refuses_to_average_different_configs(store, tmp_path, capsys):
    code = main(["report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--no-figures",
                 "--out", str(tmp_path / "out"), "--table", "2"])
    assert code == 2
    err = capsys.readouterr().err
    label = "alwa2" if "quick_alwa2_s0" in err else "base"
    for seed in (0, 1):
        assert f"quick_{label}_s{seed}" in err and f"full_{label}_s{seed}" in err, err
    assert "schedule.max_iters = 360, 40" in err, err
    assert "Traceback" not in err


def test_every_format_width_metric_option(store, tmp_path, capsys):
    code, out = report(store, tmp_path, "--table", "2", "--format", "latex", "--width", "full",
                       "--metric", "map")
    assert code == 0
    latex = (out / "table2.tex").read_text()
    assert "\\begin{table*}" in latex and "\\small" in latex
    assert sorted(p.name for p in out.iterdir()) == ["figures", "table2.tex"]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "metric_per_epoch.png" in figures and "metric_per_epoch.pdf" in figures
    code, out = report(store, tmp_path / "md", "--format", "md", "--no-figures")
    assert code == 0 and not list(out.glob("*.tex"))
    code = main(["report", "--sweep", store["sweeps"]["quick"], "--tracking-uri", store["uri"],
                 "--ci", "--resamples", "5", "--out", str(tmp_path / "x")])
    assert code == 2 and "--resamples: must be in 100..100000" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (.ci/run installs "
                    "Debian's texlive-latex-base and texlive-latex-recommended)")
def test_written_tex_files_compile_without_overfull_boxes(store, tmp_path):
    code, out = report(store, tmp_path, "--paper", "--no-figures", "--format", "latex")
    assert code == 0
    names = sorted(p.name for p in out.glob("*.tex"))
    assert names
    (out / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage{graphicx}"
                                 "\\begin{document}" + "".join(f"\\input{{{n}}}\\clearpage" for n in names)
                                 + "\\end{document}")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=out,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Overfull" not in (out / "doc.log").read_text(errors="replace")


def test_ci_prints_paired_intervals_and_welch(store, tmp_path, capsys):
    code, out = report(store, tmp_path, "--ci", "--no-figures", "--table", "2")
    assert code == 0
    printed = capsys.readouterr().out
    ci = (out / "ci.md").read_text()
    assert ci in printed
    client, finals = store["client"], store["finals"]
    base = [logged_percent(client, finals[f"quick_base_s{s}"][0]) for s in (0, 1)]
    alwa = [logged_percent(client, finals[f"quick_alwa2_s{s}"][0]) for s in (0, 1)]
    (row,) = [line for line in ci.splitlines() if "weighting.method = alwa" in line]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == seeds_text(base) and cells[3] == seeds_text(alwa)
    # Δ recomputed from detections.npz = the logged mean difference (the runs logged voc_map of them)
    delta = statistics.mean(alwa) - statistics.mean(base)
    shown = re.match(r"([+-]\d+\.\d+)( \*)?$", cells[4])
    assert shown and float(shown.group(1)) == pytest.approx(delta, abs=0.006)
    low, high = (float(v) for v in re.findall(r"[+-]\d+\.\d+", cells[5]))
    assert low < delta < high
    assert (shown.group(2) is not None) == (low > 0 or high < 0)
    assert delta > 5 and shown.group(2)  # the quick sweep's ALWA finds far more: a real delta
    from scipy.stats import ttest_ind
    assert cells[6] == f"{ttest_ind(alwa, base, equal_var=False).pvalue:.3f}"

    code, out = report(store, tmp_path / "full", "--ci", "--no-figures", "--table", "2", sweep="full")
    assert code == 0
    ci_full = (out / "ci.md").read_text()
    (row,) = [line for line in ci_full.splitlines() if "weighting.method = alwa" in line]
    low, high = (float(v) for v in re.findall(r"[+-]\d+\.\d+", row.split("|")[6]))
    assert low < 0 < high and " *" not in row.split("|")[5]  # 0.60 vs 0.62: not distinguishable here
