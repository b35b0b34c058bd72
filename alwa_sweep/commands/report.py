"""``alwa-sweep report``: the paper's Tables 1–6 and figures, rebuilt from MLflow."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from alwa_sweep.commands.argcheck import int_in
from trainers.errors import ConfigError

# reports.figures' values, repeated so that --help does not import matplotlib
# (tests/reports/test_figures_parallel.py checks they agree).
MAX_JOBS, AUTO_JOBS_CAP, TRIALS_PER_WORKER = 64, 8, 4


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", metavar="NAME", help="every trial run of this MLflow experiment")
    source.add_argument("--sweep", metavar="RUN_ID", help="the trials of this sweep (its parent run id)")
    parser.add_argument("--table", type=int, choices=range(1, 7), action="append", metavar="N",
                        help="only table N (1-6; repeatable). Default: every table that has runs")
    parser.add_argument("--format", choices=("md", "latex", "both"), default="both",
                        help="Markdown (.md), LaTeX (.tex, booktabs) or both (default)")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="output folder (default: ./report)")
    parser.add_argument("--metric", metavar="NAME",
                        help="validation metric val/NAME to tabulate (map, ap, ap50, ...); "
                             "default: the paper's (mAP on VOC, AP on COCO)")
    parser.add_argument("--paper", action="store_true",
                        help="put the paper's published numbers and the difference beside each column")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the store "
                             "`alwa-sweep run` writes by default: sqlite:///./alwa_runs/mlflow.db)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--jobs", type=int_in(1, MAX_JOBS, example=4), metavar="N",
                        help="processes drawing the trials' figures, this one included (1..%d; default: the CPUs, at "
                             "most %d, and one per %d trials)" % (MAX_JOBS, AUTO_JOBS_CAP, TRIALS_PER_WORKER))
    parser.add_argument("--compact", action="store_true",
                        help="drop rows and columns without any measured cell (small sweeps)")
    parser.add_argument("--width", choices=("text", "full"), default="text",
                        help="LaTeX float: 'text' (table, scaled down to the text width when wider) "
                             "or 'full' (table*, \\small: across both columns of a two-column page)")
    parser.add_argument("--ci", action="store_true",
                        help="is each delta real? a paired bootstrap 95%% interval over test images "
                             "(from the trials' detections.npz) and, with several seeds, mean ± std "
                             "and Welch's t-test; writes ci.md")
    parser.add_argument("--resamples", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for --ci (default 1000)")


def run(args) -> int:
    # Callers that build the Namespace themselves (``alwa-sweep demo``) may predate these.
    for option, default in (("width", "text"), ("ci", False), ("resamples", 1000), ("jobs", None)):
        if not hasattr(args, option):
            setattr(args, option, default)
    # Heavy imports here: the CLI imports every command module to build --help.
    from alwa_sweep.sweep_paths import check_writable
    from alwa_sweep.tracking import check_tracking_server, default_tracking_uri
    from tqdm import tqdm

    from reports import ci, figures, published, render, runs, search, tables

    if args.metric is not None and not re.fullmatch(r"[A-Za-z0-9_./]+", args.metric):
        raise ConfigError("--metric", f"{args.metric!r} is not a metric name.",
                          "Give the part after val/, e.g. map, ap or ap50.")
    uri = args.tracking_uri or default_tracking_uri()
    check_tracking_server(uri)
    if args.jobs is not None and not (isinstance(args.jobs, int) and 1 <= args.jobs <= MAX_JOBS):
        raise ConfigError("--jobs", f"must be an integer in 1..{MAX_JOBS}, got {args.jobs!r}.",
                          "Leave it out for the default (the CPUs, at most "
                          f"{AUTO_JOBS_CAP}), or give 1 to draw the figures in this process.")
    if not 100 <= args.resamples <= 100_000:
        raise ConfigError("--resamples", f"must be in 100..100000, got {args.resamples}.",
                          "1000 (the default) gives a stable 95% interval.")
    client = runs.open_client(uri)
    trials = runs.load_trials(client, experiment=args.experiment, sweep_run_id=args.sweep,
                              progress=True)
    source = f"experiment {args.experiment!r}" if args.experiment else f"sweep {args.sweep}"
    if trials.empty:
        raise ConfigError("--sweep" if args.sweep else "--experiment", f"{source} has no trial runs.",
                          "Check the name/run id and --tracking-uri.")
    if args.metric and runs.metric_column(args.metric) not in trials:
        found = sorted(c.removeprefix("metrics.val/") for c in trials if c.startswith("metrics.val/"))
        raise ConfigError("--metric", f"no trial has a val/{args.metric} metric.",
                          f"Metrics found: {', '.join(found) or 'none'}.")

    out = args.out
    check_writable(out, "--out")
    written = []
    heatmap_source = None
    grid_trials = search.without_searches(trials)  # sampled trials are reported in search.md
    for number in dict.fromkeys(args.table or range(1, 7)):
        table = tables.build(number, grid_trials, args.metric)
        if number == 1:
            heatmap_source = table
        if table.n_runs == 0 and not args.table:
            print(f"Table {number}: no matching runs, skipped.")
            continue
        if args.compact:
            table = tables.compact(table)
        if args.paper:
            table = published.with_paper(table)
        markdown = render.to_markdown(table)
        if args.format in ("md", "both"):
            written.append(_write(out / f"table{number}.md", markdown))
        if args.format in ("latex", "both"):
            written.append(_write(out / f"table{number}.tex", render.to_latex(table, width=args.width)))
        print(markdown)

    figure_paths = []
    written += _search_reports(trials, args, out, figure_paths)
    if not args.no_figures:
        figure_dir = out / "figures"
        jobs = args.jobs or figures.auto_jobs(len(trials))
        with tqdm(total=len(trials), desc="figures", unit=" trials", file=sys.stderr, leave=False) as bar:
            figure_paths += figures.all_trial_figures(client, trials, figure_dir, jobs=jobs, tracking_uri=uri,
                                                      on_done=bar.update)
        if heatmap_source is None:
            heatmap_source = tables.table1(grid_trials, args.metric)
        figure_paths += figures.table1_heatmap(heatmap_source, figure_dir)
        figure_paths += figures.metric_per_epoch(client, trials, figure_dir, args.metric)
    written += figure_paths

    if args.ci:
        metric_column = runs.metric_column(args.metric) if args.metric else None  # None: the main one
        found = ci.with_intervals(client, ci.comparisons(grid_trials, metric_column),
                                  n_resamples=args.resamples, progress=True)
        markdown = ci.to_markdown(found, args.resamples)
        print(markdown)
        written.append(_write(out / "ci.md", markdown))

    if args.sweep:
        for path in written:
            artifact_dir = "report/figures" if path in figure_paths else "report"
            client.log_artifact(args.sweep, str(path), artifact_path=artifact_dir)
    print(f"Wrote {len(written)} files to {out}" + (f" and logged them to sweep run {args.sweep}"
                                                   if args.sweep and written else "") + ".")
    return 0


def _search_reports(trials, args, out: Path, figure_paths: list) -> list[Path]:
    """``search.md`` (and its figure) for the search sweeps among the trials."""
    from reports import runs, search

    written: list[Path] = []
    metric = args.metric or ("ap" if set(trials.get("params.dataset.kind", [])) == {"coco"} else "map")
    for index, (keys, frame) in enumerate(search.searches(trials).items()):
        fields = keys.split(",")
        table = search.ranked(frame, fields, runs.metric_column(metric))
        markdown = search.to_markdown(fields, table, metric)
        suffix = f"_{index + 1}" if index else ""
        written.append(_write(out / f"search{suffix}.md", markdown))
        print(markdown)
        if not args.no_figures:
            paths = search.figure(fields, table, metric, out / "figures", stem=f"search{suffix}")
            figure_paths += paths  # written with the other figures
    return written


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
