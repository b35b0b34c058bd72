"""Records at paper scale (issue 18): store size, report reads and MLflow UI endpoints.

Writes N synthetic trials of the paper's real length through the real ``MlflowHook``
(``train.log_interval`` points, evaluations every epoch, a checkpoint each epoch, the
``final/…`` summary, provenance) into a store — a SQLite file, and a PostgreSQL-backed
``mlflow server`` — with the configs, names and tags of Table 1's trials
(``search_spaces/table1_loss_weight_grid.yaml``, two VOC trials per COCO trial as in
the table: 80 + 40). The rows have the engine's shape (11 metrics per iteration, ALWA
window statistics every 100 iterations, warm-up then step lr); lengths: VOC 1x 51,936
iterations (4 epochs × 12,984 at 4 × 2 images), COCO 1x 177,432 (12 × 14,786).

At each size N (the store grows: the trials of the smaller sizes stay), it times
  * report: ``reports.runs.load_trials`` + ``reports.tables.build(1..6)`` (tables read
    only the runs' latest metrics, i.e. ``final/…`` and ``val/…``), plus what the figures
    read (``figures.trial_histories`` of every trial and each trial's ``val/…`` history),
  * the UI's REST endpoints against an ``mlflow server``: runs/search (the experiment
    page, 100 runs), runs/get (the run page), metrics/get-history and
    metrics/get-history-bulk-interval (a chart) of the longest trial's ``train/loss``,
and prints the store's size and metric rows per training iteration per trial. Figures
are extrapolated linearly in N to Table 1 at full length (N = 120), and said so.

A per-iteration baseline (``log_interval = 1``, one VOC trial, SQLite) reproduces the
issue's numbers. Budgets: store ≤ 2 GB and ≤ 0.7 rows / iteration / trial; report reads
≤ 60 s; each UI endpoint ≤ 2 s.

    python benchmarks/bench_records_scale.py                 # sizes 3,6,12; sqlite + postgres
    python benchmarks/bench_records_scale.py --quick         # sizes 1,2,3 ; sqlite only, no baseline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mlflow.tracking import MlflowClient  # noqa: E402

from alwa_sweep.spec import load_spec  # noqa: E402
from alwa_sweep.tracking import MlflowHook, get_or_create_experiment, open_store, sqlite_uri  # noqa: E402
from reports import figures, runs, tables  # noqa: E402
from reports.schema import (KIND_SWEEP, KIND_TRIAL, METRIC_LOSS, STATUS_OK, TAG_KIND, TAG_SWEEP,  # noqa: E402
                            TAG_TRIAL_KEY)

VOC_ITERS_PER_EPOCH, VOC_EPOCHS = 12_984, 4
COCO_ITERS_PER_EPOCH, COCO_EPOCHS = 14_786, 12
TABLE1_VOC, TABLE1_COCO = 80, 40
BUDGET_STORE_GB, BUDGET_ROWS_PER_ITER, BUDGET_REPORT_S, BUDGET_UI_S = 2.0, 0.7, 60.0, 2.0
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def synthetic_rows(total: int, epochs: int, seed: int, lr: float = 0.02, warmup: int = 500,
                   alwa_interval: int = 100):
    """Rows shaped like the engine's (trainers/engine.py): step, epoch, lr, 7 losses,
    3 weights, and the 4 window statistics on ALWA's update iterations."""
    rnd = random.Random(seed)
    per_epoch = total // epochs
    steps = [per_epoch * (epochs - 1)] if epochs == 4 else [per_epoch * 8, per_epoch * 11]
    alpha = 1.0
    for step in range(1, total + 1):
        rate = lr * (0.1 ** sum(step > s for s in steps))
        if step <= warmup:
            rate *= 0.001 + (1 - 0.001) * step / warmup
        decay = 1.0 / (1.0 + step / 5000)
        raw = {k: v * decay * (1 + 0.2 * rnd.random()) for k, v in
               (("rpn_cls", 0.3), ("rpn_reg", 0.1), ("roi_cls", 0.6), ("roi_reg", 0.4))}
        row = {"step": step, "epoch": (step - 1) // per_epoch + 1, "weight/reg": 1.0, "lr": rate,
               **{f"train/{k}": v for k, v in raw.items()},
               "train/rpn_cls_weighted": raw["rpn_cls"] * alpha, "train/rpn_reg_weighted": raw["rpn_reg"],
               "weight/cls": alpha, "weight/alpha": alpha}
        row["train/loss"] = row["train/rpn_cls_weighted"] + row["train/rpn_reg_weighted"] + raw["roi_cls"] + raw["roi_reg"]
        if step % alwa_interval == 0:
            row.update({"window/cls_mean": raw["rpn_cls"], "window/cls_std": 0.01,
                        "window/reg_mean": raw["rpn_reg"], "window/reg_std": 0.005})
            alpha = min(2.0, max(0.01, alpha * (0.9 + 0.2 * rnd.random())))
        yield row


def val_metrics(kind: str, epoch: int, seed: int) -> dict:
    rnd = random.Random(seed * 100 + epoch)
    if kind == "coco":
        return {f"val/{k}": rnd.random() for k in ("ap", "ap50", "ap75", "aps", "apm", "apl")}
    aps = {f"val/ap/{c}": rnd.random() for c in VOC_CLASSES}
    return {"val/map": statistics.fmean(aps.values()), **aps}


def write_trial(client, experiment_id, parent, trial, log_interval: int, seed: int, length_scale: float = 1.0):
    """One trial through the real MlflowHook: (written metric rows, iterations, seconds)."""
    config = trial.config
    config = config.model_copy(update={"train": config.train.model_copy(update={"log_interval": log_interval})})
    kind = config.dataset.kind
    per_epoch, epochs = (COCO_ITERS_PER_EPOCH, COCO_EPOCHS) if kind == "coco" else (VOC_ITERS_PER_EPOCH, VOC_EPOCHS)
    per_epoch = max(1, int(per_epoch * length_scale))
    total = per_epoch * epochs
    hook = MlflowHook.create(client, experiment_id, trial.name, parent_run_id=parent,
                             tags={TAG_KIND: KIND_TRIAL, TAG_TRIAL_KEY: trial.key, TAG_SWEEP: "table1"})
    started = time.perf_counter()
    hook.start(config, 0, total)
    chunk, metrics = [], {}
    for row in synthetic_rows(total, epochs, seed):
        chunk.append(row)
        if len(chunk) == config.train.log_every or row["step"] == total:
            hook.log_iterations(chunk)
            chunk = []
        if row["step"] % per_epoch == 0:
            epoch = row["step"] // per_epoch
            metrics = val_metrics(kind, epoch, seed)
            hook.log_evaluation(epoch, row["step"], metrics)
            hook.on_checkpoint(Path(f"/nonexistent/ckpt_{row['step']:08d}.pt"), row["step"], epoch)
    hook.finish(STATUS_OK, "", metrics)
    return total, time.perf_counter() - started


def metric_rows(client, run_id: str) -> int:
    run = client.get_run(run_id)
    return sum(len(client.get_metric_history(run_id, key)) for key in run.data.metrics)


def time_report(client, experiment: str, repeats: int = 2) -> dict:
    """The fastest of ``repeats`` passes (the first also pays the client's warm-up)."""
    return min((_time_report(client, experiment) for _ in range(repeats)), key=lambda r: r["report_reads_s"])


def _time_report(client, experiment: str) -> dict:
    t0 = time.perf_counter()
    trials = runs.load_trials(client, experiment=experiment)
    t1 = time.perf_counter()
    built = [tables.build(n, trials) for n in range(1, 7)]
    t2 = time.perf_counter()
    for _, trial in trials.iterrows():
        figures.trial_histories(client, trial)
        figures.history(client, trial["run_id"], "val/ap" if trial.get("params.dataset.kind") == "coco" else "val/map")
    t3 = time.perf_counter()
    return {"load_trials_s": t1 - t0, "tables_s": t2 - t1, "figure_reads_s": t3 - t2, "report_reads_s": t3 - t0,
            "table1_runs": built[0].n_runs, "trials": len(trials)}


def _request(url: str, body: dict | None = None) -> float:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()
    return time.perf_counter() - t0


def time_ui(server_uri: str, experiment_id: str, run_id: str, repeats: int = 3) -> dict:
    api = server_uri + "/ajax-api/2.0/mlflow"
    key = urllib.parse.quote(METRIC_LOSS, safe="")
    calls = {
        "ui_runs_search_s": (f"{api}/runs/search", {"experiment_ids": [experiment_id], "max_results": 100,
                                                     "order_by": ["attributes.start_time DESC"],
                                                     "run_view_type": "ACTIVE_ONLY"}),
        "ui_run_get_s": (f"{api}/runs/get?run_id={run_id}", None),
        "ui_get_history_s": (f"{api}/metrics/get-history?run_id={run_id}&metric_key={key}", None),
        "ui_history_bulk_interval_s": (f"{api}/metrics/get-history-bulk-interval?run_ids={run_id}"
                                       f"&metric_key={key}&max_results=320", None),
    }
    for url, body in calls.values():  # the server's first answer of a kind (imports, pools) aside
        _request(url, body)
    return {name: statistics.median(_request(url, body) for _ in range(repeats)) for name, (url, body) in calls.items()}


def table1_trials():
    spec = load_spec(ROOT / "search_spaces" / "table1_loss_weight_grid.yaml", check_paths=False)
    voc = [t for t in spec.trials if t.config.dataset.kind == "voc"]
    coco = [t for t in spec.trials if t.config.dataset.kind == "coco"]
    order = []
    for i in range(len(coco)):  # two VOC trials per COCO trial, as in the table
        order += [voc[2 * i], voc[2 * i + 1], coco[i]]
    return order


def fit(xs, ys):
    """Least-squares line y = a + b x; returns (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def run_backend(name, client, size_of, server_uri, sizes, log_interval, length_scale) -> list[dict]:
    experiment = f"bench-{name}"
    experiment_id = get_or_create_experiment(client, experiment)
    parent = client.create_run(experiment_id, run_name="table1", tags={TAG_KIND: KIND_SWEEP}).info.run_id
    order = table1_trials()
    results, written, iters, longest = [], 0, 0, None
    write_s = 0.0
    for size in sizes:
        while written < size:
            trial = order[written]
            total, seconds = write_trial(client, experiment_id, parent, trial, log_interval, seed=written,
                                         length_scale=length_scale)
            written += 1
            iters += total
            write_s += seconds
            print(f"  [{name}] trial {written}/{sizes[-1]} ({trial.config.dataset.kind}, {total:,} it, "
                  f"name {len(trial.name)} chars) written in {seconds:.1f} s", flush=True)
        trial_runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'",
                                        max_results=1000)
        longest = max(trial_runs, key=lambda r: r.data.metrics.get("final/iterations", 0))
        rows = sum(metric_rows(client, r.info.run_id) for r in trial_runs)
        result = {"backend": name, "N": size, "iterations": iters, "metric_rows": rows,
                  "rows_per_iter": rows / iters, "store_bytes": size_of(), "write_s": write_s,
                  **time_report(client, experiment)}
        if server_uri:
            result.update(time_ui(server_uri, experiment_id, longest.info.run_id))
        results.append(result)
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}),
              flush=True)
    return results


def extrapolate(results: list[dict], length_scale: float) -> dict:
    xs = [r["N"] for r in results]
    out = {}
    for key in ("store_bytes", "report_reads_s", "ui_runs_search_s", "ui_run_get_s", "ui_get_history_s",
                "ui_history_bulk_interval_s"):
        if key in results[0]:
            a, b = fit(xs, [r[key] for r in results])
            value = a + b * (TABLE1_VOC + TABLE1_COCO)
            if key == "store_bytes":
                value = a + b * (TABLE1_VOC + TABLE1_COCO) / length_scale  # rows grow with length
            out[key] = max(value, max(r[key] for r in results))
    return out


def baseline(folder: Path, length_scale: float) -> dict:
    """The issue's measurement: per-iteration logging of one VOC trial into SQLite."""
    db = folder / "per_iteration.db"
    client = open_store(sqlite_uri(db))
    experiment_id = get_or_create_experiment(client, "per-iteration")
    trial = table1_trials()[0]
    total, seconds = write_trial(client, experiment_id, None, trial, 1, seed=0, length_scale=length_scale)
    run_id = client.search_runs([experiment_id])[0].info.run_id
    t0 = time.perf_counter()
    points = client.get_metric_history(run_id, METRIC_LOSS)
    history_s = time.perf_counter() - t0
    return {"iterations": total, "metric_rows": metric_rows(client, run_id), "store_bytes": db.stat().st_size,
            "write_s": seconds, "get_metric_history_s": history_s, "points": len(points)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,6,12", help="trial counts N, growing (default 3,6,12)")
    parser.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres")
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--length-scale", type=float, default=1.0,
                        help="fraction of the paper's trial length (1 = full; the store is extrapolated)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-iteration baseline")
    parser.add_argument("--quick", action="store_true", help="sizes 1,2,3, SQLite only, no baseline")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.backends, args.no_baseline = "1,2,3", "sqlite", True
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    print(f"records at scale: sizes {sizes}, log_interval {args.log_interval}, length ×{args.length_scale}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    from servers import MlflowServer, PostgresServer, postgres_missing

    work = Path(tempfile.mkdtemp(prefix="alwa-bench-records-"))
    all_results, verdicts = {}, []
    if not args.no_baseline:
        base = baseline(work, args.length_scale)
        print(f"per-iteration baseline (log_interval 1, one VOC trial, SQLite): {base['metric_rows']:,} rows, "
              f"{base['store_bytes'] / 1e6:.0f} MB, {base['metric_rows'] / base['iterations']:.2f} rows/iteration, "
              f"get_metric_history of {base['points']:,} points {base['get_metric_history_s']:.2f} s, "
              f"written in {base['write_s']:.0f} s", flush=True)
    for backend in backends:
        servers = []
        try:
            if backend == "sqlite":
                db = work / "sqlite" / "mlflow.db"
                uri = sqlite_uri(db)
                client = open_store(uri)
                server = MlflowServer(uri, work / "sqlite_server").start()
                servers.append(server)
                size_of = lambda db=db: db.stat().st_size  # noqa: E731
            elif backend == "postgres":
                missing = postgres_missing()
                if missing:
                    print(f"postgres: skipped ({missing})")
                    continue
                pg = PostgresServer().start()
                servers.append(pg)
                MlflowClient(pg.uri).search_experiments()  # migrate before the server starts
                server = MlflowServer(pg.uri, work / "pg_server").start()
                servers.append(server)
                client = open_store(server.uri)
                size_of = pg.size_bytes
            else:
                raise SystemExit(f"unknown backend {backend!r}")
            all_results[backend] = run_backend(backend, client, size_of, server.uri, sizes, args.log_interval,
                                               args.length_scale)
        finally:
            for running in reversed(servers):
                running.stop()

    print("\nhow each figure grows with N (trials in the store; 2 VOC : 1 COCO):")
    for backend, results in all_results.items():
        keys = ["metric_rows", "rows_per_iter", "store_bytes", "write_s", "load_trials_s", "tables_s",
                "figure_reads_s", "report_reads_s", "ui_runs_search_s", "ui_run_get_s", "ui_get_history_s",
                "ui_history_bulk_interval_s"]
        print(f"  {backend}: " + "  ".join(f"N={r['N']}" for r in results))
        for key in keys:
            if key in results[0]:
                print(f"    {key:28s}" + "  ".join(f"{r[key]:>12.4g}" for r in results))
        last = results[-1]
        ext = extrapolate(results, args.length_scale)
        print(f"  {backend}: EXTRAPOLATED (linear fit in N over {[r['N'] for r in results]}) to Table 1 "
              f"at full length, N = {TABLE1_VOC + TABLE1_COCO}:")
        checks = [("store size GB", ext["store_bytes"] / 1e9, BUDGET_STORE_GB),
                  ("metric rows per iteration per trial (measured)", last["rows_per_iter"], BUDGET_ROWS_PER_ITER),
                  ("report reads s (load_trials + tables + figure reads)", ext["report_reads_s"], BUDGET_REPORT_S)]
        for key in ("ui_runs_search_s", "ui_run_get_s", "ui_get_history_s", "ui_history_bulk_interval_s"):
            if key in ext:
                checks.append((f"UI {key[3:-2]} s", ext[key], BUDGET_UI_S))
        for label, value, budget in checks:
            ok = value <= budget
            verdicts.append(ok)
            print(f"    {label:58s} {value:10.3f}  budget {budget:g}  {'ok' if ok else 'OVER'}")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    passed = all(verdicts) and bool(verdicts)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
