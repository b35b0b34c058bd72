"""The report's figure stage at paper scale: old (serial, one layout per file) vs new.

Writes N trials of real length into a SQLite store with ``bench_records_scale.write_trial``
(Table 1's configs and names, two VOC trials per COCO trial; VOC 51,936 iterations, COCO
177,432; the real ``MlflowHook`` at ``train.log_interval`` 50: 1,039 / 3,549 points per loss
curve, window statistics and α every 100 iterations: 519 / 1,774 points), then times the
figure stage of ``alwa-sweep report`` (every trial's figures, Table 1's heatmap, the metric
per epoch) on the first N = 3, 6, 12, 24 trials:

  * reads only: the histories the figures read (``figures.trial_histories`` + each val
    history), serially, as bench_records_scale.py times them,
  * old: the code before this benchmark (each trial in turn; every file its own
    ``savefig(bbox_inches="tight")``, i.e. its own constrained layout and tight box),
  * new, 1 process: ``figures.all_trial_figures(jobs=1)`` (one layout per figure, both files),
  * new, J processes (``--jobs``; default the CPUs, at most 8, what report uses for 120
    trials): this process and J - 1 pool workers, each reading its trials' histories,
  * at the largest N, J workers with the reads in the parent instead (the alternative,
    measured to choose between them).
"Report's default" is the variant report picks for N trials (``figures.auto_jobs``: the
CPUs, at most 8, one per 4 trials, so 1 process below 8 trials). Each pool variant starts
a fresh forkserver, so it pays the start every ``alwa-sweep report`` pays (importing
matplotlib, pandas and MLflow once; printed first). Each size runs ``--rounds`` rounds in
rotated order and keeps each variant's fastest. Two kinds of trials: ``alwa`` (every
trial logs α and the window statistics, as bench_records_scale writes them: 3 figures, 6
files per trial) and ``table1`` (Table 1's fixed-weight trials: no α or window
statistics, the losses figure only). Every variant must write the same files as old, the
PNGs decoded pixel-identical. Times are extrapolated linearly in N to Table 1 (N = 120,
80 VOC + 40 COCO), and said so. First, on histories already read, what else would save
CPU per trial: a quarter of the points, PNG / PDF zlib level 1, PDF fonttype 42.

Claim: report's default is faster than old (median over the sizes, and at the largest),
with the same files and PNG pixels. Also printed: the extrapolated N = 120 against a 30 s
goal (out of reach on 2 shared CPUs: benchmarks/README.md).

    python benchmarks/bench_figures.py                  # N = 3,6,12,24; both kinds (~13 min)
    python benchmarks/bench_figures.py --quick          # N = 3,6; alwa; trials at 1/4 length; 1 round
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from PIL import Image  # noqa: E402

import bench_records_scale as records  # noqa: E402
from alwa_sweep.tracking import get_or_create_experiment, open_store, sqlite_uri  # noqa: E402
from reports import figures, runs, tables  # noqa: E402
from reports.schema import KIND_SWEEP, METRIC_ALPHA, TAG_KIND  # noqa: E402

TABLE1_N = records.TABLE1_VOC + records.TABLE1_COCO
GOAL_S = 30.0


# ---- the code before this change (reports/figures.py at f577726), kept as the reference ----

def old_save(figure, out_dir: Path, stem: str) -> list[Path]:
    FigureCanvasAgg(figure)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in figures.FORMATS:
        path = out_dir / f"{stem}.{fmt}"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    return paths


def old_stage(client, trials, table, out_dir: Path) -> list[Path]:
    paths = []
    for _, trial in trials.iterrows():
        histories = figures.trial_histories(client, trial)
        stem = figures.trial_stem(trial)
        for kind, figure in (("losses", figures.losses_figure(histories, figures.weighted_head(trial))),
                             ("window", figures.window_figure(histories)), ("alpha", figures.alpha_figure(histories))):
            if figure is not None:
                paths += old_save(figure, out_dir, f"{stem}_{kind}")
    for stem, figure in (("table1_heatmap", figures.heatmap_figure(table)),
                         ("metric_per_epoch", figures.metric_figure(val_curves(client, trials)))):
        if figure is not None:
            paths += old_save(figure, out_dir, stem)
    return paths


def val_metric(trial) -> str:
    return "ap" if trial.get("params.dataset.kind") == "coco" else "map"


def val_curves(client, trials):
    return [(f"{trial.get('name') or trial['run_id'][:8]} ({val_metric(trial)})",
             figures.history(client, trial["run_id"], f"val/{val_metric(trial)}") * 100.0)
            for _, trial in trials.iterrows()]


# ---- the new stage, as alwa_sweep/commands/report.py runs it ----

def new_stage(client, uri, trials, table, out_dir: Path, jobs: int) -> list[Path]:
    paths = figures.all_trial_figures(client, trials, out_dir, jobs=jobs, tracking_uri=uri)
    paths += figures.table1_heatmap(table, out_dir)
    paths += figures.metric_per_epoch(client, trials, out_dir)
    return paths


def _draw_only(histories, trial, out_dir):
    return figures.save_trial_figures(histories, trial, out_dir)


def parent_reads_stage(client, trials, table, out_dir: Path, jobs: int) -> list[Path]:
    """The alternative: histories read here (serially), the pool only draws."""
    rows = [trial for _, trial in trials.iterrows()]
    with ProcessPoolExecutor(jobs, mp_context=figures._pool_context()) as pool:
        futures = [pool.submit(_draw_only, figures.trial_histories(client, trial), trial, out_dir) for trial in rows]
        paths = [path for future in futures for path in future.result()]
    paths += figures.table1_heatmap(table, out_dir)
    paths += figures.metric_per_epoch(client, trials, out_dir)
    return paths


def reads(client, trials) -> None:
    for _, trial in trials.iterrows():
        figures.trial_histories(client, trial)
        figures.history(client, trial["run_id"], f"val/{val_metric(trial)}")


def _noop() -> int:
    return os.getpid()


def forkserver_start_s() -> float:
    """The one-off cost of the first pool of a process: the forkserver imports the figures'
    modules (reports.figures, reports.runs: matplotlib, pandas, MLflow) once."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=figures._pool_context()) as pool:
        pool.submit(_noop).result()
    return time.perf_counter() - t0


# ---- the store ----

def fixed_weight_rows(original):
    """Table 1's trials: fixed weights, so no α and no window statistics."""
    def rows(*args, **kwargs):
        for row in original(*args, **kwargs):
            yield {k: (1.0 if k == "weight/cls" else v) for k, v in row.items()
                   if not (k.startswith("window/") or k == METRIC_ALPHA)}
    return rows


def fill_store(folder: Path, kind: str, n: int, length_scale: float):
    uri = sqlite_uri(folder / f"{kind}.db")
    client = open_store(uri)
    experiment_id = get_or_create_experiment(client, f"bench-figures-{kind}")
    parent = client.create_run(experiment_id, run_name="table1", tags={TAG_KIND: KIND_SWEEP}).info.run_id
    original = records.synthetic_rows
    if kind == "table1":
        records.synthetic_rows = fixed_weight_rows(original)
    try:
        t0 = time.perf_counter()
        for i, trial in enumerate(records.table1_trials()[:n]):
            records.write_trial(client, experiment_id, parent, trial, 50, seed=i, length_scale=length_scale)
        print(f"  [{kind}] {n} trials written in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        records.synthetic_rows = original
    trials = runs.load_trials(client, sweep_run_id=parent)
    order = {name: i for i, name in enumerate(t.name for t in records.table1_trials())}
    trials = trials.sort_values("name", key=lambda names: names.map(order)).reset_index(drop=True)
    return uri, client, trials


# ---- checks ----

def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


def same_output(reference: list[Path], other: list[Path]) -> str | None:
    """None when both wrote the same file names and every PNG decodes to the same pixels."""
    names = sorted(p.name for p in reference)
    if names != sorted(p.name for p in other):
        return f"file sets differ: {len(names)} vs {len(other)}"
    by_name = {p.name: p for p in other}
    for path in reference:
        if path.stat().st_size == 0 or by_name[path.name].stat().st_size == 0:
            return f"{path.name} is empty"
        if path.suffix == ".png" and not np.array_equal(png_pixels(path), png_pixels(by_name[path.name])):
            return f"{path.name}: pixels differ"
    return None


def fit(xs, ys):
    return records.fit(xs, ys)


def timed(function, *args):
    t0 = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - t0, result


def render_options(client, trials, rounds: int = 3) -> None:
    """What else a trial's figures could save, on histories already read (drawing and
    writing only, CPU seconds per trial, the fastest of ``rounds``): the curves with a
    quarter of their points, PNG zlib level 1 (default 6), PDF zlib level 1, PDF TrueType
    (fonttype 42) instead of Type 3 fonts; each against the saving as done now."""
    import io

    import matplotlib

    voc, coco = (next(t for _, t in trials.iterrows() if t.get("params.dataset.kind") == kind) for kind in ("voc", "coco"))
    read = [(trial, figures.trial_histories(client, trial)) for trial in (voc, voc, coco)]  # 2 VOC : 1 COCO
    thinned = [(trial, {k: v.iloc[::4] for k, v in h.items()}) for trial, h in read]

    def cost(histories, rc=None, png_kwargs=None) -> tuple[float, int]:
        best, size = math.inf, 0
        for _ in range(rounds):
            t0, size = time.process_time(), 0
            with matplotlib.rc_context(rc or {}):
                for trial, h in histories:
                    for figure in (figures.losses_figure(h, figures.weighted_head(trial)), figures.window_figure(h),
                                   figures.alpha_figure(h)):
                        if figure is None:
                            continue
                        FigureCanvasAgg(figure)
                        figure.set_dpi(figures.DPI)
                        figure.draw_without_rendering()
                        bbox = figure.get_tightbbox().padded(0.1)
                        figure.set_layout_engine("none")
                        for fmt in figures.FORMATS:
                            buffer = io.BytesIO()
                            figure.savefig(buffer, format=fmt, dpi=figures.DPI, bbox_inches=bbox,
                                           **({"pil_kwargs": png_kwargs} if fmt == "png" and png_kwargs else {}))
                            size += buffer.tell()
            best = min(best, time.process_time() - t0)
        return best / len(histories), size // len(histories)

    base, base_size = cost(read)
    print(f"  drawing + writing one trial's figures (2 VOC : 1 COCO, CPU): {base:.3f} s, {base_size / 1e3:.0f} kB")
    for label, args in (("a quarter of the points", (thinned,)), ("PNG zlib level 1", (read, None, {"compress_level": 1})),
                        ("PDF zlib level 1", (read, {"pdf.compression": 1})),
                        ("PDF fonttype 42", (read, {"pdf.fonttype": 42}))):
        seconds, size = cost(*args)
        print(f"    {label:26s} {seconds:.3f} s ({seconds / base:.2f}×), {size / 1e3:.0f} kB ({size / base_size:.2f}×)",
              flush=True)


def fresh_forkserver() -> None:
    """Stop the forkserver (it outlives a pool), so the next pool pays its start as the
    first pool of an ``alwa-sweep report`` process does."""
    import multiprocessing.forkserver
    multiprocessing.forkserver._forkserver._stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,6,12,24", help="trial counts N (default 3,6,12,24)")
    parser.add_argument("--kinds", default="alwa,table1", help="alwa and/or table1")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes of the pool variant (default: the CPUs, at most "
                             f"{figures.AUTO_JOBS_CAP}, what report uses for Table 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per size, the fastest kept (default 2)")
    parser.add_argument("--length-scale", type=float, default=1.0, help="fraction of the paper's trial length")
    parser.add_argument("--quick", action="store_true", help="N = 3,6; alwa only; trials at 1/4 length; 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.kinds, args.length_scale, args.rounds = "3,6", "alwa", 0.25, 1
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    jobs = args.jobs or min(figures.available_cpus(), figures.AUTO_JOBS_CAP)
    print(f"figure stage: sizes {sizes}, kinds {kinds}, length ×{args.length_scale}, pool variant {jobs} "
          f"processes, {args.rounds} rounds (fastest kept), load average {os.getloadavg()[0]:.1f} on "
          f"{figures.available_cpus()} CPUs", flush=True)
    work = Path(tempfile.mkdtemp(prefix="alwa-bench-figures-",
                                 dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    print(f"forkserver start (imports matplotlib, pandas, MLflow; every pool variant pays it): "
          f"{forkserver_start_s():.2f} s", flush=True)
    labels = {"reads": "reads only", "old": "old", "new1": "new, 1 process", "newJ": f"new, {jobs} processes",
              "parent": f"new, {jobs} workers, reads in the parent"}
    verdicts = []
    try:
        for kind in kinds:
            uri, client, all_trials = fill_store(work, kind, sizes[-1], args.length_scale)
            if kind == kinds[0]:
                render_options(client, all_trials)
            results = []
            for n in sizes:
                trials = all_trials.head(n)
                table = tables.table1(trials)
                out = work / f"{kind}_{n}"
                variants = {
                    "reads": lambda o: reads(client, trials) or [],
                    "old": lambda o: old_stage(client, trials, table, o),
                    "new1": lambda o: new_stage(client, uri, trials, table, o, 1),
                    "newJ": lambda o: (fresh_forkserver(), new_stage(client, uri, trials, table, o, jobs))[1],
                }
                if n == sizes[-1]:
                    variants["parent"] = lambda o: (fresh_forkserver(), parent_reads_stage(client, trials, table, o,
                                                                                           jobs))[1]
                best, paths = {}, {}
                for round_ in range(args.rounds):
                    names = list(variants)
                    names = names[round_ % len(names):] + names[:round_ % len(names)]  # rotate the order
                    for name in names:
                        shutil.rmtree(out / name, ignore_errors=True)
                        seconds, paths[name] = timed(variants[name], out / name)
                        best[name] = min(best.get(name, math.inf), seconds)
                default = figures.auto_jobs(n) if args.jobs is None else jobs
                if default not in (1, jobs):
                    fresh_forkserver()
                    best["default"], paths["default"] = timed(new_stage, client, uri, trials, table,
                                                              out / "default", default)
                else:
                    best["default"] = best["new1" if default == 1 else "newJ"]
                problems = [f"{name}: {problem}" for name in paths if name not in ("reads", "old")
                            for problem in [same_output(paths["old"], paths[name])] if problem]
                r = {"N": n, "jobs": default, "files": len(paths["old"]), "identical": not problems,
                     **{f"{name}_s": seconds for name, seconds in best.items()}}
                results.append(r)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  [{kind}] N={n:3d}: {r['files']} files, " + "; ".join(
                    f"{labels[name]} {best[name]:.2f} s" for name in labels if name in best)
                    + f"; report's default ({default} process{'es' if default > 1 else ''}) "
                    f"{best['default']:.2f} s, old/default {best['old'] / best['default']:.2f}×; PNG pixels "
                    + ("identical in every variant" if not problems else "DIFFER: " + "; ".join(problems))
                    + f" (load {os.getloadavg()[0]:.1f})", flush=True)
            print(f"\n  [{kind}] seconds per trial, how they grow with N:")
            print("    " + f"{'N':>40s}" + "".join(f"{r['N']:>8d}" for r in results))
            rows = [(name, labels[name]) for name in labels if name != "parent"] + [("default", "report's default")]
            for name, label in rows:
                print(f"    {label:>40s}" + "".join(f"{r[name + '_s'] / r['N']:8.3f}" for r in results))
            print("    " + f"{'processes of the default':>40s}" + "".join(f"{r['jobs']:>8d}" for r in results))
            last = results[-1]
            if "parent_s" in last:
                print(f"    at N = {last['N']}: reads in the workers {last['newJ_s']:.2f} s, reads in the parent "
                      f"{last['parent_s']:.2f} s")
            xs = [r["N"] for r in results]
            default_120 = figures.auto_jobs(TABLE1_N) if args.jobs is None else jobs
            scale = "" if args.length_scale == 1.0 else f" (trials at {args.length_scale:g} of full length)"
            print(f"  [{kind}] EXTRAPOLATED (linear fit in N over {xs}) to Table 1, N = {TABLE1_N}{scale}:")
            ext = {}
            for name, label in rows[:-1]:
                a, b = fit(xs, [r[name + "_s"] for r in results])
                ext[name] = max(a + b * TABLE1_N, max(r[name + "_s"] for r in results))
                print(f"    {label:44s} {ext[name]:8.1f} s")
            ext["default"] = ext["new1" if default_120 == 1 else "newJ"] if default_120 in (1, jobs) else math.nan
            ratios = [r["old_s"] / r["default_s"] for r in results]
            faster = statistics.median(ratios) > 1.0 and ratios[-1] > 1.0
            identical = all(r["identical"] for r in results)
            verdicts += [faster, identical]
            print("    old / report's default: " + ", ".join(f"N={r['N']} {q:.2f}×" for r, q in zip(results, ratios))
                  + f"; median {statistics.median(ratios):.2f}×  {'ok' if faster else 'NOT FASTER'}")
            print(f"    old / new at N = {TABLE1_N} ({default_120} processes): {ext['old'] / ext['default']:.2f}×; "
                  f"new {ext['default']:.1f} s against the {GOAL_S:g} s goal: "
                  f"{'met' if ext['default'] <= GOAL_S else 'NOT met on this machine'}")
            print(f"    PNG pixels and file sets: {'identical' if identical else 'DIFFER'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passed = bool(verdicts) and all(verdicts)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
