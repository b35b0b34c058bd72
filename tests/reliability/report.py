"""The figures of the reliability suite, recorded by its tests and written to
``docs/reliability.md`` when the whole suite has run and passed.

Each test records what it measured through :class:`Figures` (JSON files, one per
section, in a folder of the session); :func:`write_report` turns them into the page.
Nothing in the page is typed by hand: every number comes from the run that wrote it.
"""

from __future__ import annotations

import json
import os
import re
import platform
import time
from pathlib import Path

# Sections the page needs; a run that lacks one (a -k selection) writes nothing.
SECTIONS = ("bad_inputs", "sigkill", "corrupt_checkpoints", "concurrency", "security", "soak", "generated_cli",
            "signal_matrix", "sweep_sigterm", "closed_classes")

# Guarantees that other test files already check end to end (not re-run here).
ELSEWHERE = [
    ("Driver killed mid-sweep, then `alwa-sweep resume`: every trial finishes exactly once",
     "tests/alwa_sweep/test_sweep.py::test_driver_killed_then_resumed_runs_every_trial_exactly_once",
     "3 trials, driver SIGKILLed after the first finished; after resume 3 MLflow runs (one per trial "
     "key), all `ok`, `train/loss` steps exactly 1..24 in each"),
    ("A diverging trial never takes down the sweep",
     "tests/alwa_sweep/test_sweep.py::test_local_sweep_isolates_a_diverging_trial",
     "3 trials, one with lr = 1e12: it ends with status `nan`, the two others `ok`, exit code 1, "
     "summary `ok=2 nan=1`"),
    ("Divergence inside the engine is a result, not a crash",
     "tests/trainers/test_engine.py::test_non_finite_loss_ends_run_with_status_nan, "
     "::test_overflowing_weighting_ends_run_with_status_overflow",
     "status `nan` / `overflow`, the run's last finite rows kept"),
    ("The MLflow UI binds loopback unless `--allow-remote`",
     "tests/reports/test_ui.py::test_ui_refuses_non_loopback_host_without_flag",
     "`--host 0.0.0.0` without the flag: exit code 2, message naming `--allow-remote`"),
]


class Figures:
    """Writes ``<folder>/<section>.json``: a mapping of values and a list of rows."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, section: str) -> Path:
        return self.folder / f"{section}.json"

    def has(self, section: str) -> bool:
        return self._path(section).exists()

    def load(self, section: str) -> dict:
        path = self._path(section)
        return json.loads(path.read_text()) if path.exists() else {"values": {}, "rows": []}

    def _save(self, section: str, data: dict) -> None:
        tmp = self._path(section).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self._path(section))

    def record(self, section: str, **values) -> None:
        data = self.load(section)
        data["values"].update(values)
        self._save(section, data)

    def add_row(self, section: str, row: dict) -> None:
        data = self.load(section)
        data["rows"].append(row)
        self._save(section, data)


def _xfail_note(xfailed: dict | None) -> str:
    if not xfailed:
        return ""
    return f" (of them {len(xfailed)} expected failure{'s' if len(xfailed) > 1 else ''}: known bugs, listed at the end)"


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _versions() -> str:
    import mlflow
    import ray
    import torch

    return (f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
            f"mlflow {mlflow.__version__}, {os.cpu_count()} CPU cores, {platform.system()}")


def write_report(figures: Figures, out: Path, *, command: str, tests: int, seconds: float,
                 durations: dict, xfailed: dict | None = None) -> None:
    sections = {name: figures.load(name) for name in SECTIONS}
    bad = sections["bad_inputs"]
    kill = sections["sigkill"]["values"]
    ckpt = sections["corrupt_checkpoints"]
    conc = sections["concurrency"]["values"]
    sec = sections["security"]["values"]
    soak = sections["soak"]["values"]

    rows = bad["rows"]
    commands = sorted({r["command"] for r in rows})
    tracebacks = sum(r["traceback"] for r in rows)
    runs_created = sum(r["mlflow_runs"] for r in rows)
    ray_started = sum(r["ray_initialized"] for r in rows)
    sweeps_created = sum(r["sweep_folder"] for r in rows)
    corrupt_rows = ckpt["rows"]
    corruptions = len(corrupt_rows)
    detected = sum(r["detected"] for r in corrupt_rows)
    generated = sections["generated_cli"]["values"]
    matrix = sections["signal_matrix"]["rows"]
    sweep_term = sections["sweep_sigterm"]["values"]
    closed = sections["closed_classes"]["rows"]
    # two SIGKILLs (a trial, a training right after a checkpoint), each corruption, each signal × phase
    # cell, the SIGTERM to a sweep
    faults = 2 + corruptions + len(matrix) + 1
    inputs = len(rows) + generated["total"] + len(closed)
    metrics_expected = conc["expected_values"] + kill["expected_steps"] + kill["gap_expected_steps"]
    metrics_stored = conc["stored_values"] + kill["stored_steps"] + kill["gap_stored_steps"]

    lines = [
        "# Reliability and security: measured figures",
        "",
        f"Generated by the reliability suite (`tests/reliability/`) on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} with",
        "",
        "```bash",
        command,
        "```",
        "",
        f"{tests} tests, all passed{_xfail_note(xfailed)}, in {seconds:.0f} s ({_versions()}). "
        "Every number below was "
        "measured by that run; `tests/reliability/report.py` writes this page at the end of a complete, "
        "passing run of the suite (a `-k` selection or a failure leaves it untouched).",
        "",
        "## Summary",
        "",
        "| guarantee | figure |",
        "|---|---|",
        f"| bad input fails before launch | {len(rows)} broken inputs over {len(commands)} commands "
        f"({', '.join(commands)}): {len(rows)} exit codes ≠ 0, {tracebacks} tracebacks, "
        f"{runs_created} MLflow runs, {sweeps_created} sweep folders, {ray_started} Ray sessions |",
        f"| inputs tried | {inputs:,}: {len(rows)} hand-written broken inputs, {generated['total']} generated "
        f"by hypothesis (validate {generated['examples']['validate']}, train {generated['examples']['train']}, "
        f"run {generated['examples']['run']}; {generated['validate_valid']} of the validate ones happened to be "
        f"valid: exit 0), {len(closed)} cases of the red team's classes; all handled: exit 2, one `error:` "
        f"block, 0 tracebacks, nothing created |",
        f"| faults injected | {faults}: a sweep's trial process SIGKILLed mid-training, a training "
        f"SIGKILLed right after writing a checkpoint, {corruptions} checkpoint corruptions (truncated, "
        f"flipped, forged; {detected} detected), {len(matrix)} signals (SIGTERM, SIGINT) × training phases, "
        f"SIGTERM to a 2-trial sweep; all handled |",
        f"| trials lost | {kill['trials_lost']} of {kill['trials']} (each trial: exactly one MLflow run, "
        f"status `ok`) |",
        f"| metrics lost | {metrics_expected - metrics_stored} of {metrics_expected:,} logged values "
        f"({conc['expected_values']:,} from {conc['processes']} concurrent writers, "
        f"{kill['expected_steps'] + kill['gap_expected_steps']} `train/loss` steps of the killed trainings) |",
        f"| \"database is locked\" errors | {conc['locked_errors']} ({conc['errors']} errors of any kind) |",
        f"| unsafe calls in {sec['files_scanned']} Python files | {sec['findings']} |",
        f"| memory over {soak['iterations']:,} iterations | RSS {soak['rss_warm_mb']:.0f} MB at iteration "
        f"{soak['warm_iteration']}, {soak['rss_end_mb']:.0f} MB at the end: "
        f"{soak['growth_mb']:+.1f} MB (bound {soak['bound_mb']} MB) |",
        "",
        "## Bad input, before launch",
        "",
        "Each input is given to the real CLI (`alwa_sweep.cli.main`, in process) with the runs folder and "
        "the MLflow store in a fresh temporary folder. Checked for every row: exit code ≠ 0; a "
        "one-paragraph message that names the field or file; no `Traceback` (it appears only with "
        "`--debug`, checked once); no `mlflow.db` created (or none with a run in it); no sweep folder; "
        "Ray not initialised. An unreachable tracking server or Ray address fails within the time shown.",
        "",
        "| # | command | broken input | exit | s | message (start) |",
        "|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(rows, 1):
        message = row["message"]
        if len(message) > 150:
            message = message[:147] + "…"
        lines.append(f"| {index} | `{row['command']}` | {_md(row['case'])} | {row['exit_code']} | "
                     f"{row['seconds']:.2f} | {_md(message)} |")

    lines += [
        "",
        "## Generated inputs (hypothesis) through the CLI",
        "",
        f"`test_generated_cli.py` generates specs, configs and `--set` values (random types, NaN/±inf, "
        f"integers up to 2²⁰⁰, sections given as scalars or lists, unknown keys in random unicode, random grid "
        f"shapes, grids past max_trials, seeds and resources out of range) and gives each to "
        f"`alwa_sweep.cli.main` with a fresh runs folder, work folder and SQLite store: "
        f"{generated['examples']['validate']} to `validate` (any values: exit 0 when valid, else 2), "
        f"{generated['examples']['train']} to `train` and {generated['examples']['run']} to `run` (each with one "
        f"field invalid by construction, which the message must name). Every example: one `error:` block, "
        f"no `Traceback`, no MLflow run, no sweep or work folder, no lock file, Ray not initialised.",
        "",
        "## Classes of the red team's list",
        "",
        "| case | exit | message (start) |",
        "|---|---|---|",
    ]
    for row in closed:
        message = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+", "<tmp>", row["message"]) if len(row["message"]) < 150 else row["message"][:147] + "…"
        lines.append(f"| {_md(row['case'])} | {row['exit_code']} | {_md(message)} |")
    lines += [
        "",
        "## Signals (SIGTERM, SIGINT) in each phase of a training",
        "",
        "`test_signal_matrix.py`: a real `alwa-sweep train` (tiny Faster R-CNN, data from `alwa-sweep "
        "make-synthetic`, 64 px, `num_workers: 0`) in a child process that wraps the phase's function to wait "
        "there; the signal is sent once the child is inside the phase. Checked: exit code 128 + signal, no "
        "traceback, the MLflow run KILLED with `alwa.status` = `interrupted` and a reason naming the signal, "
        "the work folder's lock free, no `.tmp` file, and `train --resume` finishing the same run `ok` where "
        "a checkpoint exists.",
        "",
        "| phase | signal | exit | checkpoints left | resumed from | s |",
        "|---|---|---|---|---|---|",
    ]
    for row in matrix:
        lines.append(f"| {row['phase']} | {row['signal']} | {row['exit_code']} | {row['checkpoints_left']} | "
                     f"{row['resumed_from'] or '—'} | {row['seconds']:.1f} |")
    lines += [
        "",
        f"**SIGTERM to `alwa-sweep run`** (2 trials training at once): exit code {sweep_term['exit_code']}; "
        f"parent run {sweep_term['parent']}; trial runs {', '.join(sweep_term['trials'])}; "
        f"{sweep_term['processes_seen']} processes of the driver's tree seen (raylet, GCS, workers), "
        f"{sweep_term['processes_left']} left afterwards; the sweep folder's lock free.",
    ]

    lines += [
        "",
        "## Faults during a sweep",
        "",
        f"**A trial process killed with SIGKILL** (`test_faults.py`). A real local sweep (Ray, "
        f"{kill['trials']} trials of the tiny Faster R-CNN at once, {kill['iterations']} iterations each, "
        f"a checkpoint every {kill['checkpoint_every']} iterations, `max_failures: "
        f"{kill['max_failures']}`, the dataset given as a relative path). Once the ALWA trial had logged "
        f"{kill['killed_at_step']} steps, its trainable process (pid {kill['killed_pid']}, "
        f"`{kill['killed_title']}`, working directory its Tune trial folder) was sent SIGKILL. The last "
        f"checkpoint it had reported was iteration {kill['last_reported']}. Tune restarted it in pid "
        f"{kill['restarted_pid']}, which resumed from the checkpoint of iteration {kill['resumed_from']} "
        f"(its first report: iteration {kill['first_report_after']}; Tune counts {kill['num_failures']} "
        f"failure): the steps after {kill['resumed_from']} it had already logged ({kill['recomputed_steps']} "
        f"or more) were trained again and stored once. Outcome: sweep exit code {kill['exit_code']}, "
        f"{kill['trials_ok']} of {kill['trials']} trials `ok`, {kill['runs_per_trial']} MLflow run per "
        f"trial, `train/loss` steps exactly 1..{kill['iterations']} in each "
        f"({kill['duplicate_steps']} duplicates, {kill['expected_steps'] - kill['stored_steps']} missing); "
        f"the other trial: {kill['other_failures']} failures. Sweep time {kill['seconds']:.0f} s.",
        "",
        f"**Killed right after a checkpoint is written** (`test_faults.py`). MLflow rows are written by a "
        f"background thread; a training whose store answers slowly (0.5 s per batch) was SIGKILLed the moment "
        f"checkpoint {kill['gap_checkpoint']} was on disk. Stored at the kill: steps 1..{kill['gap_stored_at_kill']}"
        f" (everything the checkpoint covers: the engine waits for the writer before writing a checkpoint); "
        f"after `train(resume=True)`: {kill['gap_stored_steps']} of {kill['gap_expected_steps']} steps, "
        f"{kill['gap_duplicates']} duplicates.",
        "",
        "**Truncated or corrupt checkpoints** (`test_faults.py`): each one is detected (SHA-256 digest or "
        "load error) and the previous checkpoint is used, with a warning.",
        "",
        "| corruption | where | detected by | fell back to |",
        "|---|---|---|---|",
    ]
    for row in corrupt_rows:
        lines.append(f"| {_md(row['corruption'])} | {_md(row['level'])} | {_md(row['detected_by'])} | "
                     f"{_md(row['fell_back_to'])} |")
    values = ckpt["values"]
    if "engine_rows_equal" in values:
        lines += ["", f"Engine level: after the newest checkpoint was truncated, `train(resume=True)` warned, "
                  f"resumed from iteration {values['engine_resumed_from']} and its {values['engine_rows_equal']} "
                  "rows (every loss, weight and α) equal the uninterrupted run's, bit for bit."]

    lines += ["", "Covered by other test files (run by the same `pytest`, not repeated here):", "",
              "| guarantee | test | what it checks |", "|---|---|---|"]
    for guarantee, test, what in ELSEWHERE:
        lines.append(f"| {guarantee} | `{test}` | {what} |")

    lines += [
        "",
        "## Concurrency: one SQLite store, many writers",
        "",
        f"{conc['processes']} processes (multiprocessing, started together behind a barrier), each "
        f"`MlflowHook` on its own child run of one pre-created SQLite store, logging "
        f"{conc['iterations']} iterations of rows like the engine's ({conc['metrics_per_row']} metrics) in "
        f"batches of {conc['batch']} rows: {conc['expected_values']:,} values expected, "
        f"{conc['stored_values']:,} read back with `get_metric_history` (every step of every metric "
        f"counted, values checked), {conc['locked_errors']} \"database is locked\", {conc['errors']} errors; "
        f"logging took {conc['log_seconds_max']:.1f} s in the slowest writer.",
        "",
        "## Security",
        "",
        f"Static checks over {sec['files_scanned']} Python files of the repository (AST): "
        + "; ".join(f"{name}: {count}" for name, count in sec["checks"].items()) + ".",
        "",
    ]
    lines += [f"- {row['check']}: {row['result'].rstrip('.')}." for row in sections["security"]["rows"]]
    lines += [
        "",
        "Known boundary: `alwa-sweep resume` lets Ray Tune restore its own experiment state "
        "(`tune/tuner.pkl`, pickled by Ray) from the sweep folder, so a sweep folder must be as trusted as "
        "the code; checkpoints, specs and configs are never unpickled or evaluated.",
    ]
    if figures.has("building_blocks"):  # issue 16's standalone pieces (test_building_blocks.py, test_properties.py)
        lines += ["", "## Building blocks: locks, signals, strict YAML, checkpoint writes, dataset files", "",
                  "| piece | what was done | measured |", "|---|---|---|"]
        for row in figures.load("building_blocks")["rows"]:
            lines.append(f"| {_md(row['piece'])} | {_md(row['input'])} | {_md(row['result'])} |")
    lines += [
        "",
        "## Soak: the engine over a long run",
        "",
        f"{soak['iterations']:,} iterations of the tiny Faster R-CNN ({soak['image_size']} px images, "
        f"batch {soak['batch_size']}, ALWA_1 with C = {soak['interval']}), every iteration's losses, weights "
        f"and α logged to a SQLite MLflow store in batches of {soak['log_every']}, evaluation at the end "
        f"only, in {soak['seconds']:.0f} s. Resident memory (RSS, `/proc/self/statm`) every "
        f"{soak['sample_every']} iterations:",
        "",
        "| iteration | " + " | ".join(str(i) for i, _ in soak["samples"]) + " |",
        "|---|" + "---|" * len(soak["samples"]),
        "| RSS (MB) | " + " | ".join(f"{mb:.0f}" for _, mb in soak["samples"]) + " |",
        "",
        f"Growth from iteration {soak['warm_iteration']} to the end: {soak['growth_mb']:+.1f} MB; the bound "
        f"is {soak['bound_mb']} MB ({soak['bound_reason']}). Logged `train/loss` steps: "
        f"{soak['logged_steps']:,} of {soak['iterations']:,}.",
        "",
        "## Test times",
        "",
        "| test (all its cases) | cases | s |",
        "|---|---|---|",
    ]
    per_test: dict[str, list[float]] = {}
    for name, seconds_taken in durations.items():
        per_test.setdefault(name.split("[")[0], []).append(seconds_taken)
    for name, times in sorted(per_test.items(), key=lambda item: -sum(item[1])):
        lines.append(f"| `{name}` | {len(times)} | {sum(times):.1f} |")
    if xfailed:
        lines += ["", "## Known bugs in files outside this suite's owner (expected failures)", "",
                  "Each is an `xfail(strict=False)` test that passes once the owner fixes the file:", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in sorted(xfailed.items())]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
